"""data.py: the world is deterministic and its splits are disjoint; the BPE round-trips and is deterministic."""
import json

import pytest

import data


def test_world_is_deterministic_and_seeded():
    assert data.make_world(50) == data.make_world(50)
    assert data.make_world(50) != data.make_world(50, seed=1)
    assert data.pretrain_corpus(data.make_world(30)) == data.pretrain_corpus(data.make_world(30))


def test_every_person_appears_in_several_paraphrases():
    world = data.make_world(20)
    docs = data.pretrain_corpus(world, bios_per_person=4).split(data.EOT)
    for p in world["people"]:
        bios = [d for d in docs if p["name"] in d]
        assert len(bios) == 4 and len(set(bios)) > 1  # different templates / orders
        assert all(p["city"] in b and p["year"] in b and p["employer"] in b and p["field"] in b for b in bios)


def test_qa_splits_ask_about_disjoint_people():
    task = data.make_task("qa", data.make_world(100))
    names = {s: {ex["prompt"].split("\n")[0] for ex in task[s]} for s in ("train", "val", "test")}
    people = {s: {p for p in (w["name"] for w in data.make_world(100)["people"]) if any(p in q for q in names[s])}
              for s in names}
    assert people["train"] and people["test"] and not (people["train"] & people["test"])
    assert not (people["train"] & people["val"]) and not (people["val"] & people["test"])


def test_sentiment_labels_and_held_out_reviews():
    task = data.make_task("sentiment", data.make_world(10))
    assert task["choices"] == [" positive", " negative"]
    assert {ex["completion"] for ex in task["test"]} == {" positive", " negative"}
    assert len(task["test"]) == 400


def test_bpe_round_trip_determinism_and_save_load(tmp_path):
    text = data.pretrain_corpus(data.make_world(40))
    enc = data.train_tokenizer(text, 600)
    assert enc.n_vocab == 600 and data.eot_id(enc) == 599
    assert data.train_tokenizer(text, 600)._mergeable_ranks == enc._mergeable_ranks
    sample = "Ünïcödé, tabs\tand 1234 newlines\n are bytes too. " + text[:300]
    assert enc.decode(enc.encode(sample, allowed_special={data.EOT})) == sample
    assert len(enc.encode(text[:2000], allowed_special={data.EOT})) < 2000 / 2.5  # merges actually compress
    path = str(tmp_path / "tok.tiktoken")
    data.save_tokenizer(enc, path)
    assert data.load_tokenizer(path).encode(sample, allowed_special="all") == enc.encode(sample, allowed_special="all")
    data.save_tokenizer(data.train_tokenizer(text, 400), path)  # same path, new content: no stale cache
    assert data.load_tokenizer(path).n_vocab == 400


def test_unknown_named_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="could not load the tiktoken encoding 'nope'"):
        data.named_tokenizer("nope")


def test_user_files_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.load_text(str(tmp_path / "empty.txt"))
    lines = [json.dumps(dict(prompt=f"p{i}", completion=f" c{i}")) for i in range(12)]
    (tmp_path / "ok.jsonl").write_text("\n".join(lines))
    task = data.load_jsonl_task(str(tmp_path / "ok.jsonl"))
    assert [len(task[s]) for s in ("train", "val", "test")] == [9, 1, 2]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:3] + ['{"prompt": "x"}'] + lines[3:]))
    with pytest.raises(ValueError, match="line 4"):
        data.load_jsonl_task(str(tmp_path / "bad.jsonl"))


def test_qa_probe_asks_the_test_facts_in_biography_words():
    world = data.make_world(50)
    task = data.make_task("qa", world)
    assert len(task["probe"]) == len(task["test"])
    sentences = {t.format(name=p["name"], v=p[a]) for p in world["people"] for a, (_, ts, _) in data.ATTRS.items()
                 for t in ts}  # every biography sentence the world can write
    for ex in task["probe"]:
        assert ex["prompt"] + ex["completion"] + "." in sentences
