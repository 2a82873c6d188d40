"""
Tokenizers, every one of them a tiktoken Encoding: a byte-level BPE trained here on your corpus
(bpe.py; kept in tiktoken's rank-file format), and the tokenizers of released models, read offline
from their own files.

    from kit import tokenizer
    enc = tokenizer.train(text, vocab_size=2048)      # our byte-level BPE
    tokenizer.save(enc, "out/tok.tiktoken")
    enc = tokenizer.load("out/tok.tiktoken")          # or a model's folder, or a .gguf file
    enc = tokenizer.named("gpt2")                     # tiktoken's own; needs a network or its cache

A released model's tokenizer is its tokens (byte strings) ranked in merge order, its special tokens,
and its pre-tokenizer pattern. GPT-2's pattern keeps runs of digits together; SmolLM2's splits every
digit apart first (SMOLLM_PAT); Qwen2's (QWEN2_PAT) splits digits apart too, takes contractions in
any case and keeps a line's trailing newlines with its punctuation, and its text is put in Unicode's
NFC form first (é as one code point), as Qwen's own tokenizer does. SmolLM2's vocabulary has no
token for 21 byte values. Encoding drops the characters that would need one (six ASCII control
characters, such as 0x04, and the unassigned planes U+40000-U+BFFFF) and encodes the text on either
side apart, which is what SmolLM2's own tokenizer does with the control characters (it drops the
byte of an unassigned code point's lead and keeps its three others).
"""
import base64
import hashlib
import json
import operator
import os
import re
import time
import unicodedata

import tiktoken
import tiktoken.load
import torch

from kit import disk, pretrained
from kit.bpe import EOT, PAT, pieces, train_bpe
from kit.gguf_reader import read_gguf
from kit.released_config import refuse


# GPT-2's own pattern, as tiktoken's gpt2 encoding (r50k_base) writes it; tiktoken's regex engine
# reads \p{L}.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# SmolLM2's: every digit alone, then GPT-2's pattern on the text between digits. A run of spaces
# before a digit ends a piece there, so it stays whole: (?![^\s\p{N}]) is GPT-2's (?!\S) with that
# piece boundary.
SMOLLM_PAT = (r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$"""
              r"""|\s+(?![^\s\p{N}])|\s""")
# Qwen2's, as its tokenizer.json (and transformers' Qwen2Tokenizer) writes it: contractions in any
# case, a letter run with one non-letter before it, every digit alone, punctuation with the newlines
# after it, newlines with the spaces before them.
QWEN2_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
             r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PAT, "smollm": SMOLLM_PAT, "qwen2": QWEN2_PAT}


class Encoding(tiktoken.Encoding):
    """tiktoken's Encoding, plus the end-of-text id, the characters its vocabulary can't encode:
    those are dropped, and the text on either side is encoded apart (a dropped character still ends
    a pre-token), and a Unicode normal form (nfc=True: Qwen2's) the text is put in first."""
    chat_template = None  # an Instruct model's, from its files (--chat reads ChatML: kit/chat.py)

    def __init__(self, name, pat_str, mergeable_ranks, special_tokens, eot, drop=None, nfc=False):
        super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                         special_tokens=special_tokens)
        self.eot, self.drop, self.nfc = eot, drop and re.compile(drop), nfc

    def encode_ordinary(self, text):
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        if self.drop is None or not self.drop.search(text):
            return super().encode_ordinary(text)
        # (zero-argument super() doesn't reach into a comprehension)
        plain = tiktoken.Encoding.encode_ordinary
        return [i for part in self.drop.split(text) for i in plain(self, part)]

    def encode(self, text, **kw):
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        if self.drop is None or not self.drop.search(text):
            return super().encode(text, **kw)
        return [i for part in self.drop.split(text)
                for i in tiktoken.Encoding.encode(self, part, **kw)]


# --------------------------------------------------------------------------------------------------
# Training our own BPE

def encode_corpus(enc, text, log=print):
    """Token ids of a whole corpus (documents joined by EOT) as one tensor, encoded in pieces on
    threads."""
    eot, out, shown, done = enc.eot, [], time.time(), 0
    for d, doc in enumerate(text.split(EOT)):
        if d:
            out.append(torch.tensor([eot]))
        parts = list(pieces(doc))
        for i in range(0, len(parts), 16):
            out += [torch.tensor(ids, dtype=torch.long)
                    for ids in enc.encode_ordinary_batch(parts[i:i + 16])]
            done += sum(map(len, parts[i:i + 16]))
            if time.time() - shown > 5:  # progress every 5 s: only long corpora print it
                log(f"tokenized {done / 1e6:.0f} of {len(text) / 1e6:.0f} MB of the corpus")
                shown = time.time()
    return torch.cat(out)


def encoding(ranks, name="own-bpe"):
    """Our BPE's ranks as an Encoding, with <|endoftext|> as the id after the last token."""
    return Encoding(name, PAT, ranks, {EOT: len(ranks)}, eot=len(ranks))


def train(text, vocab_size=2048, log=print):
    return encoding(train_bpe(text, vocab_size, log=log))


def save(enc, path):
    """tiktoken's own rank-file format: one 'base64(token) rank' per line, written aside and then
    renamed."""
    ranked = sorted(enc._mergeable_ranks.items(), key=lambda x: x[1])
    disk.save_file(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranked).encode(), path)


# --------------------------------------------------------------------------------------------------
# Loading: our rank files, and the tokenizers of released models

def load(path):
    """A .tiktoken rank file saved by save(), or a model's tokenizer: a folder (tokenizer.json, or
    vocab.json + merges.txt) or a .gguf file (its tokenizer.ggml.* metadata)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"a tokenizer must be a path (a string or a pathlib.Path), got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return load_tokenizer_json(os.path.join(path, "tokenizer.json"))
        return load_gpt2_folder(path)
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path!r} not found" + ("" if not os.path.exists(path) else
                                                           " (it is not a regular file)"))
    if path.endswith(".gguf"):
        return load_gguf(path)
    # tiktoken caches files by path alone; passing the content hash makes it re-read a retrained
    # file
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=digest)
    except Exception as e:
        raise ValueError(f"tokenizer file {path!r} is damaged ({type(e).__name__}): delete that "
                         f"file to train it again") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise ValueError(f"tokenizer file {path!r} is damaged (its ranks are not 0..n-1): delete "
                         f"that file to train it again")
    return encoding(ranks)


def bytes_to_unicode():
    """GPT-2's table from bytes to the printable characters that stand for them in vocab.json and
    merges.txt: printable bytes stand for themselves, the other 68 for U+0100 upward, in byte
    order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def from_vocab(vocab, merges, specials, pat, name, where, eos=None, nfc=False):
    """An Encoding from a model's vocabulary ({token string: id}, strings in GPT-2's byte-to-unicode
    form), its merges in order, and its special tokens. tiktoken ranks a merge by its token's id,
    the model by its line in the merges: the two agree when ids grow in merge order, as they do in
    GPT-2 and SmolLM2; anything else is refused rather than encoded differently."""
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    if not all(isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) and i >= 0
               for t, i in vocab.items()):
        raise ValueError(f"{where}: the vocabulary is not a mapping of token strings to ids")
    try:
        ranks = {bytes(to_byte[ch] for ch in tok): i
                 for tok, i in vocab.items() if tok not in specials}
        merged = [bytes(to_byte[ch] for ch in a + b) for a, b in merges]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{where}: the vocabulary or the merges are not in GPT-2's byte-level "
                         f"format") from None
    ids = [ranks.get(m) for m in merged]
    singles = {t[0] for t in ranks if len(t) == 1}
    if (None in ids or any(a >= b for a, b in zip(ids, ids[1:]))
            or len(ranks) != len(singles) + len(merged)):
        raise ValueError(f"{where}: the merges and the vocabulary disagree (ids must grow in "
                         f"merge order, one token per merge): tiktoken can't reproduce this "
                         f"tokenizer exactly")
    if len(set(ranks.values()) | set(specials.values())) != len(ranks) + len(specials):
        raise ValueError(f"{where}: two tokens share one id")
    eot = specials.get(EOT, eos)
    if eot is None or eot not in specials.values():
        raise ValueError(f"{where}: no {EOT} (or end-of-sequence) special token")
    return Encoding(name, pat, ranks, specials, eot=eot,
                    drop=unencodable(set(range(256)) - singles, where), nfc=nfc)


def unencodable(missing, where):
    """A regex of the characters whose UTF-8 bytes include one the vocabulary has no token for, or
    None."""
    # a continuation byte: most non-ASCII text would need it
    if any(0x80 <= b < 0xC0 for b in missing):
        raise ValueError(f"{where}: the vocabulary has no token for byte {min(missing):#04x}, "
                         f"which most non-ASCII characters need")
    ranges = []  # (first, last) code point
    for b in sorted(missing):
        if b < 0x80:                 # an ASCII character
            ranges.append((b, b))
        elif 0xC2 <= b < 0xE0:       # the lead byte of 64 two-byte characters
            ranges.append(((b & 0x1F) << 6, ((b & 0x1F) << 6) + 0x3F))
        elif 0xE0 <= b < 0xF0:       # ... of 4,096 three-byte characters
            ranges.append(((b & 0x0F) << 12, ((b & 0x0F) << 12) + 0xFFF))
        elif 0xF0 <= b <= 0xF4:      # ... of 262,144 four-byte characters
            ranges.append(((b & 0x07) << 18, ((b & 0x07) << 18) + 0x3FFFF))
        # C0, C1 and F5-FF never occur in UTF-8
    return "[" + "".join(f"\\U{a:08x}-\\U{z:08x}" for a, z in ranges) + "]" if ranges else None


def load_gpt2_folder(path):
    """vocab.json (token string -> id) and merges.txt of a model folder, with GPT-2's
    pre-tokenizer."""
    files = [os.path.join(path, f) for f in ("vocab.json", "merges.txt")]
    if not all(os.path.isfile(f) for f in files):
        raise ValueError(f"{path} has no tokenizer.json, nor vocab.json and merges.txt: "
                         f"its tokenizer is missing")
    vocab = pretrained.read_json(files[0], "a mapping of token strings to ids")
    with open(files[1], encoding="utf-8") as f:
        merges = [line.split() for line in f.read().split("\n")
                  if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{files[1]}: every line must be two tokens separated by a space")
    return from_vocab(vocab, merges, {EOT: vocab.get(EOT)} if EOT in vocab else {}, GPT2_PAT,
                      os.path.basename(os.path.normpath(path)), path)


def load_tokenizer_json(file):
    """The hub's tokenizer.json, for byte-level BPE models: GPT-2's pre-tokenizer, SmolLM2's (digits
    apart first) or Qwen2's (its own Split pattern, and NFC). Any other model, normalizer or
    pre-tokenizer is refused by name."""
    t = pretrained.read_json(file, "a JSON object")
    model, pre = t.get("model") or {}, t.get("pre_tokenizer") or {}
    typed(file, ("model", model, dict), ("pre_tokenizer", pre, dict),
          ("normalizer", t.get("normalizer") or {}, dict),
          ("added_tokens", t.get("added_tokens", []), list))
    typed(file, *((f"pre_tokenizer.pretokenizers[{i}]", p, dict)
                  for i, p in enumerate(pre.get("pretokenizers", []))))
    typed(file, *((f"added_tokens[{i}]", a, dict) for i, a in enumerate(t.get("added_tokens") or [])))
    typed(file, ("model.merges", model.get("merges", []), list),
          ("model.vocab", model.get("vocab") or {}, dict))
    if not all(isinstance(m, str) and m.count(" ") == 1 or isinstance(m, list) and len(m) == 2
               and all(isinstance(x, str) for x in m) for m in model.get("merges", [])):
        raise ValueError(f"{file}: model.merges must be 'a b' strings or [a, b] pairs")
    if not all(isinstance(a.get("content"), str) and isinstance(a.get("id"), int)
               for a in t.get("added_tokens", [])):
        raise ValueError(f"{file}: each of added_tokens needs a string content and an integer id")
    sequence = (pre.get("pretokenizers") or [{}]) if pre.get("type") == "Sequence" else [pre]
    steps, first, byte_level = [p.get("type") for p in sequence], sequence[0], sequence[-1]
    split = first.get("pattern") if isinstance(first.get("pattern"), dict) else {}
    # the three we read, as the pattern each amounts to: ByteLevel's own regex is GPT-2's; after
    # Qwen2's Split, ByteLevel maps bytes only (use_regex false)
    pat = {("ByteLevel",): GPT2_PAT,
           ("Digits", "ByteLevel"): SMOLLM_PAT if first.get("individual_digits") else None,
           ("Split", "ByteLevel"): QWEN2_PAT if (split.get("Regex") == QWEN2_PAT and not
                                                 first.get("invert") and
                                                 first.get("behavior") == "Isolated") else None,
           }.get(tuple(steps))
    normalizer = t.get("normalizer")
    reasons = [(model.get("type") != "BPE", f"a {model.get('type')} model, not BPE"),
               (normalizer not in (None, {"type": "NFC"}),
                f"a normalizer ({(normalizer or {}).get('type')})"),
               (pat is None, f"the pre-tokenizer {steps}"),
               (pat is not None and byte_level.get("use_regex", True) != (pat != QWEN2_PAT),
                f"ByteLevel's use_regex {byte_level.get('use_regex')} after {steps[0]}"),
               (byte_level.get("add_prefix_space", False), "a space added before the text"),
               (model.get("byte_fallback", False), "byte fallback")]
    refuse(file, reasons)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    vocab = model.get("vocab") or {}
    # added tokens are matched whole by the hub's tokenizer; here they are special tokens (encoded
    # where allowed), the non-special ones too (Qwen2's <tool_call>) unless the BPE makes them
    specials = {a["content"]: a["id"] for a in t.get("added_tokens", [])
                if a.get("special") or a["content"] not in vocab}
    return from_vocab(vocab, merges, specials, pat,
                      os.path.basename(os.path.dirname(os.path.abspath(file))), file,
                      nfc=normalizer is not None)


def typed(file, *parts):
    """One line for the first (name, value, type) whose value is of another type."""
    for name, value, kind in parts:
        if not isinstance(value, kind):
            raise ValueError(f"{file}: its {name} is a {type(value).__name__}, where tokenizer.json "
                             f"has a {'JSON object' if kind is dict else 'list'}")


def load_gguf(file):
    """The tokenizer a .gguf file carries: tokenizer.ggml.tokens (id = rank), .merges, .token_type
    (3: control and 4: user-defined, both special here; 5: unused, left out) and .pre, the
    pre-tokenizer's name (qwen2: with NFC, as Qwen's own tokenizer)."""
    meta, _, _ = read_gguf(file)
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise ValueError(f"{file}: its tokenizer is {kind!r}; only byte-level BPE ('gpt2') is read")
    if pre not in PATTERNS and pre not in ("default", "gpt-2"):
        raise ValueError(f"{file}: its pre-tokenizer {pre!r} is not one we know "
                         f"({', '.join(PATTERNS)})")
    tokens, types = meta.get("tokenizer.ggml.tokens", []), meta.get("tokenizer.ggml.token_type", [])
    merges = meta.get("tokenizer.ggml.merges", [])
    for key, value, kind in (("tokens", tokens, str), ("token_type", types, int),
                             ("merges", merges, str)):
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise ValueError(f"{file}: tokenizer.ggml.{key} must be a list of "
                             f"{'strings' if kind is str else 'integers'}")
    if not all(m.count(" ") == 1 for m in merges):
        raise ValueError(f"{file}: each of tokenizer.ggml.merges must be two tokens and a space")
    if len(types) != len(tokens):
        raise ValueError(f"{file}: {len(tokens)} tokens but {len(types)} token types")
    merges = [m.split(" ") for m in merges]
    # user-defined tokens (Qwen2's <tool_call>) are matched whole, like the control ones; unused
    # ones ([PAD151665] ...) only fill the embedding's rows
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (3, 4, 5)}
    enc = from_vocab({**vocab, **specials}, merges, specials, PATTERNS.get(pre, GPT2_PAT),
                     os.path.basename(file), file, eos=meta.get("tokenizer.ggml.eos_token_id"),
                     nfc=pre == "qwen2")
    enc.chat_template = meta.get("tokenizer.chat_template")
    return enc


def save_gpt2_folder(enc, path):
    """Write vocab.json + merges.txt for one of our BPE encodings (ids in merge order), as GPT-2
    folders hold them. Each token's merge is the split that BPE itself makes of its bytes with the
    lower-ranked tokens."""
    to_char = bytes_to_unicode()
    text = lambda t: "".join(to_char[b] for b in t)
    ranks = enc._mergeable_ranks
    vocab, merges = {text(t): r for t, r in ranks.items()}, []
    for t, r in sorted(ranks.items(), key=lambda x: x[1]):
        if len(t) > 1:
            a, b = bpe_split(t, ranks, r)
            merges.append(f"{text(a)} {text(b)}")
    vocab[EOT] = enc.eot_token
    disk.save_file(json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
                          os.path.join(path, "vocab.json"))
    disk.save_file(("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"),
                          os.path.join(path, "merges.txt"))


def bpe_split(token, ranks, limit):
    """The last merge that builds `token`: run BPE on its bytes with only the tokens ranked below
    `limit`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def named(name):
    """A named tiktoken encoding such as gpt2; fetching one needs a network or a filled
    TIKTOKEN_CACHE_DIR."""
    try:
        e = tiktoken.get_encoding(name)
    except Exception as e:
        raise ValueError(f"could not load the tiktoken encoding {name!r} ({type(e).__name__}); "
                         f"it needs a network or a filled TIKTOKEN_CACHE_DIR. Leave out "
                         f"--tokenizer to train the offline BPE.") from None
    return Encoding(name, e._pat_str, e._mergeable_ranks, e._special_tokens, eot=e.eot_token)


def identity(enc):
    """A hash of everything that decides how text becomes ids: the pattern, the tokens and the
    special tokens. Two tokenizers with the same identity encode every text alike, wherever they
    were read from."""
    h = hashlib.sha256(enc._pat_str.encode()
                       + json.dumps(sorted(enc._special_tokens.items())).encode())
    for t, r in sorted(enc._mergeable_ranks.items(), key=operator.itemgetter(1)):  # by rank
        h.update(r.to_bytes(4, "little") + len(t).to_bytes(2, "little") + t)
    h.update(str(enc.eot).encode()
             + (getattr(enc, "drop", None) and enc.drop.pattern or "").encode()
             + (b"NFC" if getattr(enc, "nfc", False) else b""))  # (no change to older hashes)
    return h.hexdigest()[:16]
