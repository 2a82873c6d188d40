"""tokenizer.py: our BPE round-trips, is deterministic and bounded; a model's tokenizer (vocab.json + merges.txt,
tokenizer.json, or a .gguf file's metadata) encodes exactly as a merge-by-merge BPE of its own files does, with
SmolLM2's pre-tokenizer (digits apart) where the file names it, and Qwen2's (its pattern, NFC, its special tokens);
characters without a token are dropped."""
import json
import re

import pytest
import torch

from kit import tokenizer, world
from conftest import tiny_gpt
from files import gguf_meta, gguf_tensors, write_gguf, write_tokenizer_json

TRICKY = ["Ünïcödé café naïve résumé", "東京は日本の首都です。中文字符", "emoji 🎉🚀 and 👍🏽 skin tones",
          "runs   of    spaces\tand\ttabs", "new\nlines\n\n\nand\r\nwindows",
          "don't we'll they're I'm it's you've he'd",
          "digits 1234567 3.14159 2026-11-29", "  leading and trailing  ", "<|endoftext|> as plain text", ""]


@pytest.fixture(scope="module")
def world_text():
    return world.pretrain_corpus(world.make_world(40))


def test_bpe_round_trip_determinism_and_save_load(tmp_path, world_text):
    enc = tokenizer.train(world_text, 600)
    assert enc.n_vocab == 600 and enc.eot == 599
    assert tokenizer.train(world_text, 600)._mergeable_ranks == enc._mergeable_ranks
    sample = "".join(TRICKY) + world_text[:300]
    assert enc.decode(enc.encode(sample, allowed_special={tokenizer.EOT})) == sample
    assert len(enc.encode(world_text[:2000], allowed_special={tokenizer.EOT})) < 2000 / 2.5  # merges actually compress
    path = str(tmp_path / "tok.tiktoken")
    tokenizer.save(enc, path)
    assert tokenizer.load(path).encode(sample, allowed_special="all") == enc.encode(sample, allowed_special="all")
    tokenizer.save(tokenizer.train(world_text, 400), path)  # same path, new content: no stale cache
    assert tokenizer.load(path).n_vocab == 400


def test_training_is_bounded_by_distinct_words_and_reports_it(world_text):
    lines = []
    rare = " ".join(f"zq{i}x" for i in range(3000))  # 3,000 words seen once each
    full = tokenizer.train_bpe(world_text + rare, 500, log=lines.append)
    bounded = tokenizer.train_bpe(world_text + rare, 500, max_words=1000, log=lines.append)
    assert any(re.search(r"training on the 1,000 most frequent \(\d+\.\d% of all pre-tokens", line) for line in lines)
    assert len(set(full) & set(bounded)) / len(bounded) > 0.9  # the frequent words decide nearly every merge


def test_pieces_keep_every_character_and_whitespace_runs():
    text = "alpha beta\n\n  gamma\ndelta " * 500
    parts = list(tokenizer.pieces(text, size=100))
    assert "".join(parts) == text and len(parts) > 10
    assert all(p.endswith("\n") and not p.endswith("\n\n") for p in parts[:-1])


def test_whole_corpus_encoding_equals_one_call(world_text):
    enc = tokenizer.train(world_text, 500)
    ids = tokenizer.encode_corpus(enc, world_text + "\nmore\n\n text" * 3)
    assert torch.equal(ids, torch.tensor(enc.encode(world_text + "\nmore\n\n text" * 3, allowed_special={tokenizer.EOT})))


def reference_bpe(folder, text, digits=False):
    """GPT-2's own algorithm (its encoder.py), independent of tiktoken: cut text into pre-tokens, then in each
    one apply merges.txt's merges in their file order (lowest line first) and look the pieces up in vocab.json.
    With digits (SmolLM2's pre-tokenizer), every digit is a piece of its own first, and the text between
    digits is cut apart."""
    vocab = json.load(open(folder / "vocab.json", encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    rank = {tuple(m.split()): i for i, m in enumerate(lines) if m}
    to_char = tokenizer.bytes_to_unicode()
    out = []
    pieces = re.split(r"(\d)", text) if digits else [text]
    for word in (w for piece in pieces for w in re.findall(tokenizer.PAT, piece)):
        parts = [to_char[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(rank.get((a, b), 1e9), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == 1e9:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [vocab[p] for p in parts]
    return out


def test_gpt2_folder_encodes_as_its_own_merges_do(tmp_path, world_text):
    enc = tokenizer.train(world_text + "".join(TRICKY) * 3, 700)
    tokenizer.save_gpt2_folder(enc, tmp_path)
    folder = tokenizer.load(str(tmp_path))
    assert folder.n_vocab == enc.n_vocab and folder.eot == enc.eot
    for text in TRICKY + [world_text[:3000]]:
        ids = folder.encode_ordinary(text)
        assert ids == reference_bpe(tmp_path, text) == enc.encode_ordinary(text), text
        assert folder.decode(ids) == text


def test_inconsistent_gpt2_folders_are_refused(tmp_path, world_text):
    with pytest.raises(ValueError, match="has no tokenizer.json, nor vocab.json and merges.txt"):
        tokenizer.load(str(tmp_path))
    tokenizer.save_gpt2_folder(tokenizer.train(world_text, 400), tmp_path)
    merges = (tmp_path / "merges.txt").read_text().split("\n")
    merges[1], merges[2] = merges[2], merges[1]  # merge order no longer follows the ids
    (tmp_path / "merges.txt").write_text("\n".join(merges))
    with pytest.raises(ValueError, match="ids must grow in merge order"):
        tokenizer.load(str(tmp_path))


def test_unknown_named_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="could not load the tiktoken encoding 'nope'"):
        tokenizer.named("nope")


DIGITS = ["year 2024  5", "a  5", "x   12  3 \n 4", "1,000,000.00$", "  \n 7", "tab\t9", "ab'12's 3'll",
          "Hello 123world456 foo", "\n\n\n123\n\n", "pi = 3.14159 and e = 2.71828"]


def test_tokenizer_json_with_smollm2s_pre_tokenizer_splits_digits_apart(tmp_path, world_text):
    enc = tokenizer.train(world_text + "".join(TRICKY) * 3 + " 0123456789" * 20, 700)
    tokenizer.save_gpt2_folder(enc, tmp_path)
    write_tokenizer_json(enc, tmp_path / "tokenizer.json")
    smol = tokenizer.load(str(tmp_path))  # tokenizer.json comes first
    assert smol._pat_str == tokenizer.SMOLLM_PAT and smol.eot == enc.eot
    for text in TRICKY + DIGITS:
        assert smol.encode_ordinary(text) == reference_bpe(tmp_path, text, digits=True), text
    assert smol.encode_ordinary("2024") == [smol.encode_single_token(d) for d in "2024"]
    write_tokenizer_json(enc, tmp_path / "tokenizer.json", digits=False)
    assert tokenizer.load(str(tmp_path))._pat_str == tokenizer.GPT2_PAT


def test_a_gguf_files_tokenizer_is_its_own_and_refused_when_unknown(tmp_path, world_text):
    enc = tokenizer.train(world_text + " 0123456789" * 20, 500)
    model = tiny_gpt(arch="llama", vocab_size=enc.n_vocab)
    path = write_gguf(tmp_path / "m.gguf", gguf_meta(model, enc), gguf_tensors(model))
    from_gguf = tokenizer.load(path)
    assert from_gguf._mergeable_ranks == enc._mergeable_ranks and from_gguf._pat_str == tokenizer.SMOLLM_PAT
    assert from_gguf.eot == enc.eot
    assert tokenizer.identity(from_gguf) != tokenizer.identity(enc)  # the patterns differ
    bad = write_gguf(tmp_path / "b.gguf", gguf_meta(model, enc, **{"tokenizer.ggml.pre": "falcon"}), {})
    with pytest.raises(ValueError, match="its pre-tokenizer 'falcon' is not one we know"):
        tokenizer.load(bad)


def test_characters_without_a_token_are_dropped_and_end_a_piece(world_text):
    enc = tokenizer.train(world_text, 500)
    kept = sorted((t for t in enc._mergeable_ranks if t != b"\x04"), key=enc._mergeable_ranks.get)  # no 0x04
    ranks = {t: i for i, t in enumerate(kept)}
    lost = tokenizer.Encoding("gaps", tokenizer.PAT, ranks, {tokenizer.EOT: len(ranks)}, eot=len(ranks),
                              drop=tokenizer.unencodable({4}, "test"))
    assert lost.encode_ordinary("ab\x04cd") == lost.encode_ordinary("ab") + lost.encode_ordinary("cd")
    plane = tokenizer.unencodable({0xF1}, "test")  # the lead byte of U+40000-U+7FFFF
    assert re.fullmatch(plane, "\U00040000") and re.fullmatch(plane, "\U0007ffff")
    assert not re.fullmatch(plane, "\U00080000") and not re.fullmatch(plane, "a")
    with pytest.raises(ValueError, match="no token for byte 0x80, which most non-ASCII characters need"):
        tokenizer.unencodable({0x80}, "test")


def test_tokenizer_metadata_of_the_wrong_type_is_one_line(tmp_path, world_text):
    enc = tokenizer.train(world_text, 400)
    model = tiny_gpt(arch="llama", vocab_size=enc.n_vocab)
    meta = gguf_meta(model, enc)
    for key, value, message in (("tokenizer.ggml.tokens", [["a"], ["b"]], "tokenizer.ggml.tokens must be a list of "
                                                                          "strings"),
                                ("tokenizer.ggml.merges", [1, 2], "tokenizer.ggml.merges must be a list of strings"),
                                ("tokenizer.ggml.merges", ["abc"], "each of tokenizer.ggml.merges must be two tokens")):
        bad = write_gguf(tmp_path / "b.gguf", {**meta, key: value}, {})
        with pytest.raises(ValueError, match=message):
            tokenizer.load(bad)
    path = tmp_path / "m" / "tokenizer.json"
    path.parent.mkdir()
    write_tokenizer_json(enc, path)
    good = json.loads(path.read_text())
    for edit, message in ((lambda t: t.update(model=[1]), "its model is a list, where tokenizer.json has a JSON "
                                                          "object"),
                          (lambda t: t.update(pre_tokenizer="ByteLevel"), "its pre_tokenizer is a str"),
                          (lambda t: t["pre_tokenizer"].update(pretokenizers=["Digits"]),
                           r"its pre_tokenizer.pretokenizers\[0\] is a str"),
                          (lambda t: t["model"].update(merges=[1, 2]), "model.merges must be 'a b' strings"),
                          (lambda t: t.update(added_tokens=[dict(content=3, id="x")]), "each of added_tokens needs"),
                          (lambda t: t.update(added_tokens="<eot>"), "its added_tokens is a str")):
        broken = json.loads(json.dumps(good))
        edit(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            tokenizer.load_tokenizer_json(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, not a JSON object"):
        tokenizer.load_tokenizer_json(str(path))


QWEN2_PIECES = [  # how Qwen2's pattern cuts text, written out by hand
    ("I'M here DON'T 12345 a\n\n b",
     ["I", "'M", " here", " DON", "'T", " ", "1", "2", "3", "4", "5", " a", "\n\n", " b"]),
    ("x  \n\n  y   z", ["x", "  \n\n", " ", " y", "  ", " z"]),  # spaces before newlines go with them
    ("Hello!!!\n\nWorld's", ["Hello", "!!!\n\n", "World", "'s"]),  # punctuation keeps the newlines after it
    ("we'Ll\r\n\r\n  it's", ["we", "'Ll", "\r\n\r\n", " ", " it", "'s"]),
    ("$3.14 (x)  \n", ["$", "3", ".", "1", "4", " (", "x", ")", "  \n"]),
]


def test_qwen2s_pattern_splits_digits_contractions_in_any_case_and_newlines():
    ranks = {bytes([b]): b for b in range(256)}
    for piece in (p.encode() for _, pieces in QWEN2_PIECES for p in pieces):
        for k in range(2, len(piece) + 1):  # every prefix: BPE then makes each piece one token, and no more
            ranks.setdefault(piece[:k], len(ranks))
    qwen2, gpt2 = (tokenizer.Encoding("pieces", pat, ranks, {tokenizer.EOT: len(ranks)}, eot=len(ranks), nfc=nfc)
                   for pat, nfc in ((tokenizer.QWEN2_PAT, True), (tokenizer.GPT2_PAT, False)))
    for text, pieces in QWEN2_PIECES:
        assert [qwen2.decode([t]) for t in qwen2.encode_ordinary(text)] == pieces, text
    assert [gpt2.decode([t]) for t in gpt2.encode_ordinary(" DON'T")] == [" DON", "'", "T"]  # GPT-2's: 't only
    assert qwen2.encode_ordinary("cafe\u0301") == qwen2.encode_ordinary("caf\u00e9")  # NFC first: one é
    assert gpt2.encode_ordinary("cafe\u0301") != gpt2.encode_ordinary("caf\u00e9")


def test_qwen2s_tokenizer_from_a_gguf_and_a_tokenizer_json_with_its_special_tokens(tmp_path, world_text):
    enc = tokenizer.train(world_text + " 0123456789" * 20, 500)
    n = enc.eot_token
    meta = gguf_meta(tiny_gpt(arch="qwen2", vocab_size=n + 5), enc)  # qwen2's architecture and pre-tokenizer
    extra = [("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool_call>", 4), ("[PAD504]", 5)]  # control, user, unused
    meta["tokenizer.ggml.tokens"] += [t for t, _ in extra]
    meta["tokenizer.ggml.token_type"] += [kind for _, kind in extra]
    from_gguf = tokenizer.load(write_gguf(tmp_path / "q.gguf", meta, {}))
    write_tokenizer_json(enc, tmp_path / "tokenizer.json", qwen2=True,
                         added=[("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False)])
    from_json = tokenizer.load(str(tmp_path))
    text = "<|im_start|>user\nDON'T 42<tool_call><|im_end|>"
    for qwen2 in (from_gguf, from_json):
        assert qwen2._pat_str == tokenizer.QWEN2_PAT and qwen2.nfc and qwen2.eot == n
        assert qwen2._special_tokens == {tokenizer.EOT: n, "<|im_start|>": n + 1, "<|im_end|>": n + 2,
                                         "<tool_call>": n + 3}  # the unused [PAD504] is left out
        assert qwen2.encode(text, allowed_special="all") == [n + 1, *qwen2.encode_ordinary("user\nDON'T 42"),
                                                             n + 3, n + 2]
        assert max(qwen2.encode_ordinary(text)) < n  # as text unless allowed
        assert qwen2.encode_ordinary("42") == [qwen2.encode_single_token(d) for d in "42"]
    assert tokenizer.identity(from_gguf) == tokenizer.identity(from_json) != tokenizer.identity(enc)
    good = json.loads((tmp_path / "tokenizer.json").read_text())
    for edit, message in ((lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\p{L}+"),
                           r"the pre-tokenizer \['Split', 'ByteLevel'\]"),
                          (lambda t: t["pre_tokenizer"]["pretokenizers"][1].update(use_regex=True),
                           "ByteLevel's use_regex True after Split"),
                          (lambda t: t.update(normalizer=dict(type="NFKC")), r"a normalizer \(NFKC\)")):
        broken = json.loads(json.dumps(good))
        edit(broken)
        (tmp_path / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            tokenizer.load(str(tmp_path))
