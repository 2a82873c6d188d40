"""Everything below the card: model files and tokenizers, data, runs and checkpoints, the command line, benchmarks."""
