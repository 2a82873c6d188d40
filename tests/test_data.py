"""data.py: the world is deterministic and its splits are disjoint; your own files load or fail on one line;
classification is detected; long prompts are cut from the left."""
import json
import re

import pytest

import data
import tokenizer


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
    names = [w["name"] for w in data.make_world(100)["people"]]
    people = {s: {n for n in names if any(n in ex.prompt for ex in getattr(task, s))} for s in ("train", "val", "test")}
    assert people["train"] and people["test"] and not (people["train"] & people["test"])
    assert not (people["train"] & people["val"]) and not (people["val"] & people["test"])


def test_out_of_distribution_splits_use_wordings_training_never_shows():
    world = data.make_world(60)
    qa = data.make_task("qa", world)
    wording = lambda ex: re.sub(r"[A-Z][a-z]+ [A-Z][a-z]+", "X", ex.prompt)  # the question without its name
    assert not {wording(ex) for ex in qa.ood} & {wording(ex) for ex in qa.train + qa.val + qa.test}
    assert [ex.completion for ex in qa.ood] == [ex.completion for ex in qa.test]  # same facts, new questions
    sentiment = data.make_task("sentiment", world)
    shape = lambda ex: re.sub("|".join(data.ITEMS + data.GOOD + data.BAD), "_", ex.prompt)
    assert not {shape(ex) for ex in sentiment.ood} & {shape(ex) for ex in sentiment.train}
    assert {ex.completion for ex in sentiment.ood} == {" positive", " negative"}


def test_heldout_documents_are_not_in_the_pretraining_corpus():
    world = data.make_world(40)
    docs = set(data.pretrain_corpus(world).split(data.EOT))
    heldout = data.heldout_corpus(world)
    assert len(heldout) > 200 and not set(heldout) & docs


def test_sentiment_labels_and_held_out_reviews():
    task = data.make_task("sentiment", data.make_world(10))
    assert task.choices == [" positive", " negative"] and task.metric == "accuracy"
    assert {ex.completion for ex in task.test} == {" positive", " negative"}
    assert len(task.test) == 400 and 0.4 < task.majority() < 0.6


def test_qa_probe_asks_the_test_facts_in_biography_words():
    world = data.make_world(50)
    task = data.make_task("qa", world)
    assert len(task.probe) == len(task.test)
    sentences = {t.format(name=p["name"], v=p[a]) for p in world["people"] for a, (_, ts, _) in data.ATTRS.items()
                 for t in ts}  # every biography sentence the world can write
    for ex in task.probe:
        assert ex.prompt + ex.completion + "." in sentences


def write(tmp_path, name, lines, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines).encode(encoding))
    return str(path)


@pytest.mark.parametrize("labels,classification", [(2, True), (20, True), (21, False), (None, False)])
def test_classification_is_detected_from_the_completions(tmp_path, labels, classification):
    n = 200
    lines = [dict(prompt=f"item {i}:", completion=f" label{i % labels}" if labels else f" answer {i}")
             for i in range(n)]
    task = data.load_jsonl_task(write(tmp_path, "t.jsonl", lines))
    assert (task.choices is not None) == classification and task.metric == ("accuracy" if classification else
                                                                          "exact_match")
    if classification:
        assert len(task.choices) == labels
    forced = data.load_jsonl_task(write(tmp_path, "t.jsonl", lines), metric="exact_match")
    assert forced.choices is None


def test_text_label_lines_go_through_the_template_and_give_the_majority_baseline(tmp_path):
    lines = [dict(text=f"review {i}", label=["good", "bad", "bad"][i % 3]) for i in range(300)]
    task = data.load_jsonl_task(write(tmp_path, "t.jsonl", lines), template="Review: {text}\nSentiment:")
    assert task.choices == [" bad", " good"]
    ex = task.train[0]
    assert re.fullmatch(r"Review: review \d+\nSentiment:", ex.prompt) and ex.completion in task.choices
    assert task.majority() == sum(e.completion == " bad" for e in task.test) / len(task.test)
    assert dict(task.label_counts()) == {" bad": sum(e.completion == " bad" for e in task.train),
                                         " good": sum(e.completion == " good" for e in task.train)}


def test_labels_train_alone_and_free_text_ends_where_generation_stops(tmp_path):
    enc = tokenizer.train("the cat sat on the mat " * 50 + "Sentiment: good bad", 300)
    lines = [dict(text=f"review {i}", label=["good", "bad"][i % 2]) for i in range(40)]
    for metric, end in (("auto", []), ("exact_match", [tokenizer.eot_id(enc)])):
        task = data.encode_task(data.load_jsonl_task(write(tmp_path, "t.jsonl", lines), metric=metric), enc, 32)
        assert all(ex.completion_ids == enc.encode_ordinary(ex.completion) + end for ex in task.train + task.test)


def test_long_prompts_are_cut_from_the_left_and_counted(tmp_path):
    enc = tokenizer.train("the cat sat on the mat " * 200 + "Sentiment: good bad", 300)
    lines = [dict(text="word " * (300 if i % 4 == 0 else 3), label=["good", "bad"][i % 2]) for i in range(40)]
    task = data.load_jsonl_task(write(tmp_path, "t.jsonl", lines), template="{text}\nSentiment:")
    data.encode_task(task, enc, block_size=32, extra=4)
    every = task.train + task.val + task.test
    assert task.truncated == sum(len(ex.prompt) > 100 for ex in every) > 0
    for ex in every:
        assert len(ex.prompt_ids) + len(ex.completion_ids) + 4 <= 32
        assert enc.decode(ex.prompt_ids).endswith("\nSentiment:")  # the end, with its cue, is kept


def test_user_files_give_one_line_errors_naming_the_line(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.load_text(str(tmp_path / "empty.txt"))
    good = [dict(prompt=f"p{i}", completion=f" c{i}") for i in range(12)]
    task = data.load_jsonl_task(write(tmp_path, "ok.jsonl", good[:6] + [""] + good[6:]))  # blank lines are fine
    assert [len(task.train), len(task.val), len(task.test)] == [9, 1, 2]
    cases = [('{"prompt": "x"}', "line 4: expected"), ('not json', "line 4: expected"),
             ('{"prompt": "  ", "completion": " y"}', "line 4: the prompt is empty"),
             ('{"text": "x", "label": 0.5}', "line 4: expected")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            data.load_jsonl_task(write(tmp_path, "bad.jsonl", good[:3] + [bad] + good[3:]))


def test_byte_order_marks_load_and_other_encodings_name_the_line(tmp_path):
    good = [dict(prompt=f"café {i}", completion=f" c{i}") for i in range(12)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x, ensure_ascii=False) for x in good).encode())
    assert len(data.load_jsonl_task(str(path)).train) == 9
    latin = write(tmp_path, "latin.jsonl", [json.dumps(x, ensure_ascii=False) for x in good], encoding="latin-1")
    with pytest.raises(ValueError, match=r"latin.jsonl' is not UTF-8 text: line 1 "):
        data.load_jsonl_task(latin)
