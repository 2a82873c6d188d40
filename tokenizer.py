"""
Tokenizers, every one of them a tiktoken.Encoding: a byte-level BPE trained here on your corpus, tiktoken's
rank-file format to keep it, tiktoken's named encodings, and the vocab.json + merges.txt of GPT-2 folders.

    import tokenizer
    enc = tokenizer.train(text, vocab_size=2048)      # our byte-level BPE
    tokenizer.save(enc, "out/tok.tiktoken")
    enc = tokenizer.load("out/tok.tiktoken")          # or a GPT-2 folder: tokenizer.load("models/gpt2")
    enc = tokenizer.named("gpt2")                     # tiktoken's own; needs a network or its cache

BPE (Sennrich et al. 2016, byte-level as in GPT-2): start from the 256 bytes and repeatedly merge the most frequent
adjacent pair into a new token. Text is first cut into pre-tokens (words with their leading space, numbers,
punctuation) and merges never cross them, so training only needs each distinct pre-token once, with its count.
"""
import base64
import hashlib
import heapq
import json
import os
import re
import tempfile
import time
from collections import Counter, defaultdict

import tiktoken
import tiktoken.load
import torch

EOT = "<|endoftext|>"

# Pre-tokens as in GPT-2 (contractions, words with their leading space, numbers, punctuation, spaces), written so that
# Python's re (for training) and tiktoken (for encoding) read it alike.
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
# GPT-2's own pattern, exactly as tiktoken's gpt2 encoding (r50k_base) writes it; tiktoken's regex engine reads \p{L}.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


# ----------------------------------------------------------------------------------------------------------------------
# Training our own BPE

def pieces(text, size=1 << 22):
    """Cut text into pieces of about `size` characters, each ending at a newline that is followed by a non-space
    character, so that no pre-token (runs of whitespace included) is cut and every piece can be handled alone."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        cut = text.rfind("\n", start, end - 1) if end < len(text) else -1
        while cut > start and text[cut + 1].isspace():
            cut = text.rfind("\n", start, cut)
        end = cut + 1 if cut > start else end  # no such newline: cut anyway (a pre-token may split; rare)
        yield text[start:end]
        start = end


def count_words(text, log=print):
    """Pre-token counts, piece by piece, so a large corpus never becomes one huge list of strings."""
    counts, shown, done = Counter(), time.time(), 0
    for piece in pieces(text):
        counts.update(re.findall(PAT, piece.replace(EOT, " ")))
        done += len(piece)
        if time.time() - shown > 5:  # progress every 5 s: only long corpora print it
            log(f"BPE: counted the pre-tokens of {done / 1e6:.0f} of {len(text) / 1e6:.0f} MB")
            shown = time.time()
    return counts


def train_bpe(text, vocab_size, max_words=100_000, log=print):
    """Byte-level BPE: merge the most frequent adjacent pair (ties: smallest ids) until vocab_size - 1 tokens
    (one id is kept for <|endoftext|>). Pairs are counted over distinct pre-tokens, and after each merge only the
    words that held the pair are recounted. Like the trainers used in practice, the work is bounded by the number of
    distinct pre-tokens, not the corpus size: only the max_words most frequent ones are merged over (rare words,
    which change few merges, are dropped; the log says what share of the text the kept ones cover)."""
    counts = count_words(text, log)
    kept = counts.most_common(max_words)
    if len(counts) > max_words:
        share = sum(n for _, n in kept) / sum(counts.values())
        log(f"BPE: {len(counts):,} distinct pre-tokens; training on the {max_words:,} most frequent "
            f"({100 * share:.1f}% of all pre-tokens in the text)")
    words = [[list(w.encode("utf-8")), n] for w, n in kept]
    tokens = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {t: i for i, t in enumerate(tokens)}
    pairs, where = Counter(), defaultdict(set)  # pair -> count, pair -> indices of words holding it
    for wi, (ids, n) in enumerate(words):
        for p in zip(ids, ids[1:]):
            pairs[p] += n
            where[p].add(wi)
    heap = [(-c, p) for p, c in pairs.items()]  # lazy max-heap: stale entries are skipped when popped
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
    """Replace the pair p by the token `new` in every word that holds it, keeping the pair counts up to date.
    Returns the pairs whose counts changed."""
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


def encode_corpus(enc, text, log=print):
    """Token ids of a whole corpus (documents joined by EOT) as one tensor, encoded in pieces on several threads."""
    eot, out, shown, done = eot_id(enc), [], time.time(), 0
    for d, doc in enumerate(text.split(EOT)):
        if d:
            out.append(torch.tensor([eot]))
        parts = list(pieces(doc))
        for i in range(0, len(parts), 16):
            out += [torch.tensor(ids, dtype=torch.long) for ids in enc.encode_ordinary_batch(parts[i:i + 16])]
            done += sum(map(len, parts[i:i + 16]))
            if time.time() - shown > 5:  # progress every 5 s: only long corpora print it
                log(f"tokenized {done / 1e6:.0f} of {len(text) / 1e6:.0f} MB of the corpus")
                shown = time.time()
    return torch.cat(out)


def encoding(ranks, name="own-bpe", pat=PAT, eot_id=None):
    return tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks) if eot_id is None else eot_id})


def train(text, vocab_size=2048, log=print):
    return encoding(train_bpe(text, vocab_size, log=log))


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading: tiktoken's rank files, GPT-2 folders, named encodings

def save(enc, path):
    """tiktoken's own rank-file format: one 'base64(token) rank' per line, written aside and then renamed."""
    ranked = sorted(enc._mergeable_ranks.items(), key=lambda x: x[1])
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranked]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path):
    """A .tiktoken rank file saved by save(), or a GPT-2 folder (vocab.json + merges.txt)."""
    if os.path.isdir(path):
        return load_gpt2_folder(path)
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path!r} not found")
    # tiktoken caches files by path alone; passing the content hash makes it re-read a file that was retrained
    digest = hashlib.sha256(open_bytes(path)).hexdigest()
    try:
        return encoding(tiktoken.load.load_tiktoken_bpe(path, expected_hash=digest))
    except Exception as e:
        raise ValueError(f"tokenizer file {path!r} is damaged ({type(e).__name__}): delete it to train it again") \
            from None


def open_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def bytes_to_unicode():
    """GPT-2's table from bytes to the printable characters that stand for them in vocab.json and merges.txt:
    printable bytes stand for themselves, the other 68 for U+0100 upward, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def load_gpt2_folder(path):
    """vocab.json (token string -> id) and merges.txt of a GPT-2 folder as a tiktoken.Encoding, offline.
    tiktoken ranks a merge by its token's id, the folder's tokenizer by its line in merges.txt: the two agree
    when ids grow in merge order, as in every GPT-2 size; anything else is refused rather than encoded differently."""
    files = [os.path.join(path, f) for f in ("vocab.json", "merges.txt")]
    if not all(os.path.isfile(f) for f in files):
        raise ValueError(f"{path} has no vocab.json and merges.txt: a GPT-2 folder needs both for its tokenizer")
    with open(files[0], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(files[1], encoding="utf-8") as f:
        merges = [line.split() for line in f.read().split("\n") if line and not line.startswith("#version")]
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[ch] for ch in tok): i for tok, i in vocab.items() if tok != EOT}
        merged = [bytes(to_byte[ch] for ch in a + b) for a, b in merges]
    except (KeyError, ValueError):
        raise ValueError(f"{path}: vocab.json or merges.txt is not in GPT-2's byte-level format") from None
    ids = [ranks.get(m) for m in merged]
    if None in ids or any(a >= b for a, b in zip(ids, ids[1:])) or len(ranks) != 256 + len(merged):
        raise ValueError(f"{path}: merges.txt and vocab.json disagree (ids must grow in merge order, one token per "
                         f"merge): tiktoken can't reproduce this tokenizer exactly")
    if EOT not in vocab:
        raise ValueError(f"{path}/vocab.json has no {EOT} token")
    return encoding(ranks, name=os.path.basename(os.path.normpath(path)), pat=GPT2_PAT, eot_id=vocab[EOT])


def save_gpt2_folder(enc, path):
    """Write vocab.json + merges.txt for one of our BPE encodings (ids in merge order), as GPT-2 folders hold them.
    Each token's merge is the split that BPE itself makes of its bytes with the lower-ranked tokens."""
    to_char = bytes_to_unicode()
    text = lambda t: "".join(to_char[b] for b in t)
    ranks = enc._mergeable_ranks
    vocab, merges = {text(t): r for t, r in ranks.items()}, []
    for t, r in sorted(ranks.items(), key=lambda x: x[1]):
        if len(t) > 1:
            a, b = bpe_split(t, ranks, r)
            merges.append(f"{text(a)} {text(b)}")
    vocab[EOT] = enc.eot_token
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def bpe_split(token, ranks, limit):
    """The last merge that builds `token`: run BPE on its bytes with only the tokens ranked below `limit`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def named(name):
    """A named tiktoken encoding such as gpt2; fetching one needs a network or a filled TIKTOKEN_CACHE_DIR."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise ValueError(f"could not load the tiktoken encoding {name!r} ({type(e).__name__}); it needs a network or a "
                         f"filled TIKTOKEN_CACHE_DIR. Leave out --tokenizer to train the offline BPE.") from None


def eot_id(enc):
    return enc.encode(EOT, allowed_special={EOT})[0]
