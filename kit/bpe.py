"""
Training a byte-level BPE (Sennrich et al. 2016, byte-level as in GPT-2) on your corpus: start from
the 256 bytes and repeatedly merge the most frequent adjacent pair into a new token. Text is first
cut into pre-tokens (words with their leading space, numbers, punctuation) and merges never cross
them, so training only needs each distinct pre-token once, with its count. tokenizer.py turns the
result into a tiktoken Encoding.

    ranks = bpe.train_bpe(text, vocab_size=2048)      # {token bytes: rank}
"""
import heapq
import re
import time
from collections import Counter, defaultdict

EOT = "<|endoftext|>"  # the document separator of our corpora (and GPT-2's end-of-text token)

# Pre-tokens as in GPT-2 (contractions, words with their leading space, numbers, punctuation,
# spaces), written so that Python's re (for training) and tiktoken (for encoding) read it alike.
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


def pieces(text, size=1 << 22):
    """Cut text into pieces of about `size` characters, each ending at a newline that is followed by
    a non-space character, so that no pre-token (runs of whitespace included) is cut and every piece
    can be handled alone."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        cut = text.rfind("\n", start, end - 1) if end < len(text) else -1
        while cut > start and text[cut + 1].isspace():
            cut = text.rfind("\n", start, cut)
        # no such newline: cut anyway (a pre-token may split; rare)
        end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def count_words(text, log=print):
    """Pre-token counts, piece by piece, so a large corpus never becomes one huge list of
    strings."""
    counts, shown, done = Counter(), time.time(), 0
    for piece in pieces(text):
        counts.update(re.findall(PAT, piece.replace(EOT, " ")))
        done += len(piece)
        if time.time() - shown > 5:  # progress every 5 s: only long corpora print it
            log(f"BPE: counted the pre-tokens of {done / 1e6:.0f} of {len(text) / 1e6:.0f} MB")
            shown = time.time()
    return counts


def train_bpe(text, vocab_size, max_words=100_000, log=print):
    """Byte-level BPE: merge the most frequent adjacent pair (ties: smallest ids) until
    vocab_size - 1 tokens (one id is kept for <|endoftext|>). Pairs are counted over distinct
    pre-tokens, and after each merge only the words that held the pair are recounted. Like the
    trainers used in practice, the work is bounded by the number of distinct pre-tokens, not the
    corpus size: only the max_words most frequent ones are merged over (the log says what share of
    the text they cover)."""
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"a byte-level BPE needs at least 257 tokens (256 bytes + end-of-text), "
                         f"got {vocab_size}")
    counts = count_words(text, log)
    kept = counts.most_common(max_words)
    if len(counts) > max_words:
        share = sum(n for _, n in kept) / sum(counts.values())
        log(f"BPE: {len(counts):,} distinct pre-tokens; training on the {max_words:,} most "
            f"frequent ({100 * share:.1f}% of all pre-tokens in the text)")
    words = [[list(w.encode("utf-8")), n] for w, n in kept]
    tokens = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {t: i for i, t in enumerate(tokens)}
    pairs, where = Counter(), defaultdict(set)  # pair -> count, pair -> indices of words holding it
    for wi, (ids, n) in enumerate(words):
        for p in zip(ids, ids[1:]):
            pairs[p] += n
            where[p].add(wi)
    # lazy max-heap: stale entries are skipped when popped
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    t0 = shown = time.time()
    while len(tokens) < vocab_size - 1 and heap:
        c, p = heapq.heappop(heap)
        if -c != pairs.get(p, 0) or c == 0:
            continue
        merged = tokens[p[0]] + tokens[p[1]]
        if merged not in ranks:  # two merge paths can spell the same bytes; keep one id for them
            ranks[merged] = len(tokens)
            tokens.append(merged)
        for q in merge_pair(words, where.pop(p), p, ranks[merged], pairs, where):
            if pairs[q] > 0:
                heapq.heappush(heap, (-pairs[q], q))
        if time.time() - shown > 5:
            log(f"BPE: {len(tokens):,} of {vocab_size:,} tokens | {time.time() - t0:.0f}s")
            shown = time.time()
    return ranks


def merge_pair(words, holders, p, new, pairs, where):
    """Replace the pair p by the token `new` in every word that holds it, keeping the pair counts up
    to date. Returns the pairs whose counts changed."""
    touched = set()
    for wi in holders:
        ids, n = words[wi]
        for q in zip(ids, ids[1:]):
            pairs[q] -= n
            touched.add(q)
        out, j = [], 0
        while j < len(ids):
            if j + 1 < len(ids) and (ids[j], ids[j + 1]) == p:
                out.append(new)
                j += 2
            else:
                out.append(ids[j])
                j += 1
        words[wi][0] = out
        for q in zip(out, out[1:]):
            pairs[q] += n
            where[q].add(wi)
            touched.add(q)
    return touched
