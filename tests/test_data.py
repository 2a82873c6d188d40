"""world.py and data.py: the world is deterministic and its splits are disjoint; your own files load (one file,
or split files, or a folder) or fail on one line; classification is detected; long inputs are cut from the
left; labels that differ only in spaces are refused."""
import json
import re

import pytest

from kit import data, task_files, tokenizer, world


def load(path, **kw):
    return data.load_task(data.TaskOptions(task=path, **kw))


def test_world_is_deterministic_and_seeded():
    assert world.make_world(50) == world.make_world(50)
    assert world.make_world(50) != world.make_world(50, seed=1)
    assert world.pretrain_corpus(world.make_world(30)) == world.pretrain_corpus(world.make_world(30))


def test_every_person_appears_in_several_paraphrases():
    w = world.make_world(20)
    docs = world.pretrain_corpus(w, bios_per_person=4).split(tokenizer.EOT)
    for p in w["people"]:
        bios = [d for d in docs if p["name"] in d]
        assert len(bios) == 4 and len(set(bios)) > 1  # different templates / orders
        assert all(p["city"] in b and p["year"] in b and p["employer"] in b and p["field"] in b for b in bios)


def test_qa_splits_ask_about_disjoint_people():
    task = load("qa", people=100)
    names = [w["name"] for w in world.make_world(100)["people"]]
    people = {s: {n for n in names if any(n in ex.input for ex in getattr(task, s))} for s in ("train", "val", "test")}
    assert people["train"] and people["test"] and not (people["train"] & people["test"])
    assert not (people["train"] & people["val"]) and not (people["val"] & people["test"])


def test_out_of_distribution_splits_use_wordings_training_never_shows():
    qa = load("qa", people=60)
    wording = lambda ex: re.sub(r"[A-Z][a-z]+ [A-Z][a-z]+", "X", ex.input)  # the question without its name
    assert not {wording(ex) for ex in qa.ood} & {wording(ex) for ex in qa.train + qa.val + qa.test}
    assert [ex.answer for ex in qa.ood] == [ex.answer for ex in qa.test]  # same facts, new questions
    sentiment = load("sentiment", people=60)
    shape = lambda ex: re.sub("|".join(world.ITEMS + world.GOOD + world.BAD), "_", ex.input)
    assert not {shape(ex) for ex in sentiment.ood} & {shape(ex) for ex in sentiment.train}
    assert {ex.answer for ex in sentiment.ood} == {" positive", " negative"}


def test_heldout_documents_are_not_in_the_pretraining_corpus():
    w = world.make_world(40)
    docs = set(world.pretrain_corpus(w).split(tokenizer.EOT))
    heldout = world.heldout_corpus(w)
    assert len(heldout) > 200 and not set(heldout) & docs


def test_sentiment_labels_and_held_out_reviews():
    task = load("sentiment", people=10)
    assert task.choices == [" positive", " negative"] and task.metric == "accuracy"
    assert {ex.answer for ex in task.test} == {" positive", " negative"}
    assert len(task.test) == 400 and 0.4 < task.majority() < 0.6


def test_qa_probe_asks_the_test_facts_in_biography_words():
    w = world.make_world(50)
    task = load("qa", people=50)
    assert len(task.probe) == len(task.test)
    sentences = {t.format(name=p["name"], v=p[a]) for p in w["people"] for a, (_, ts, _) in world.ATTRS.items()
                 for t in ts}  # every biography sentence the world can write
    for ex in task.probe:
        assert ex.input + ex.answer + "." in sentences


def write(tmp_path, name, lines, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines).encode(encoding))
    return str(path)


@pytest.mark.parametrize("labels,classification", [(2, True), (20, True), (21, False), (None, False)])
def test_classification_is_detected_from_the_answers(tmp_path, labels, classification):
    lines = [dict(prompt=f"item {i}:", completion=f" label{i % labels}" if labels else f" answer {i}")
             for i in range(200)]
    task = load(write(tmp_path, "t.jsonl", lines))
    assert (task.choices is not None) == classification
    assert task.metric == ("accuracy" if classification else "exact_match")
    if classification:
        assert len(task.choices) == labels
    assert load(write(tmp_path, "t.jsonl", lines), metric="exact_match").choices is None


def test_text_label_lines_go_through_the_template_and_give_the_majority_baseline(tmp_path):
    lines = [dict(text=f"review {i}", label=["good", "bad", "bad"][i % 3]) for i in range(300)]
    task = load(write(tmp_path, "t.jsonl", lines), template="Review: {text}\\nSentiment:")
    assert task.choices == [" bad", " good"] and task.labelled
    ex = task.train[0]
    assert re.fullmatch(r"Review: review \d+\nSentiment:", ex.input) and ex.answer in task.choices
    assert task.majority() == sum(e.answer == " bad" for e in task.test) / len(task.test)
    assert dict(task.label_counts()) == {" bad": sum(e.answer == " bad" for e in task.train),
                                         " good": sum(e.answer == " good" for e in task.train)}


def test_split_files_and_a_folder_of_them(tmp_path):
    lines = lambda a, b: [dict(text=f"review {i}", label=["good", "bad"][i % 2]) for i in range(a, b)]
    train, val, test, ood = (write(tmp_path, f"{s}.jsonl", lines(*r)) for s, r in
                             dict(train=(0, 50), val=(50, 60), test=(60, 75), ood=(75, 80)).items())
    task = load(train, val=val, test=test, ood=ood)
    assert [len(task.train), len(task.val), len(task.test), len(task.ood)] == [50, 10, 15, 5]
    assert {ex.input for ex in task.test} == {f"Text: review {i}\nLabel:" for i in range(60, 75)}
    folder = load(str(tmp_path))  # the same four files, found by their names
    assert [len(folder.train), len(folder.val), len(folder.test), len(folder.ood)] == [50, 10, 15, 5]
    only_test = load(train, test=test)  # the missing split: 10% of --task's lines
    assert [len(only_test.train), len(only_test.val), len(only_test.test)] == [45, 5, 15]
    with pytest.raises(ValueError, match="is a folder of split files: put val.jsonl in it"):
        load(str(tmp_path), val=val)
    with pytest.raises(ValueError, match="the qa task comes split: leave out --val"):
        load("qa", val=val)


def test_labels_that_differ_only_in_spaces_are_refused(tmp_path):
    lines = [dict(prompt=f"x{i}", completion=[" yes", " no", "yes "][i % 3]) for i in range(30)]
    with pytest.raises(ValueError, match=r"line \d+ has the label ' yes' and .* line \d+ has 'yes ': labels "
                                         r"that differ only in spaces"):
        load(write(tmp_path, "t.jsonl", lines))


def test_labels_train_alone_and_free_text_ends_where_generation_stops(tmp_path):
    enc = tokenizer.train("the cat sat on the mat " * 50 + "Sentiment: good bad", 300)
    lines = [dict(text=f"review {i}", label=["good", "bad"][i % 2]) for i in range(40)]
    for metric, end in (("auto", []), ("exact_match", [enc.eot])):
        task = data.encode_task(load(write(tmp_path, "t.jsonl", lines), metric=metric), enc, 32)
        assert all(ex.answer_ids == enc.encode_ordinary(ex.answer) + end for ex in task.train + task.test)


def test_long_inputs_are_cut_from_the_left_and_counted(tmp_path):
    enc = tokenizer.train("the cat sat on the mat " * 200 + "Sentiment: good bad", 300)
    lines = [dict(text="word " * (300 if i % 4 == 0 else 3) + f"no{i}", label=["good", "bad"][i % 2]) for i in range(40)]
    task = load(write(tmp_path, "t.jsonl", lines), template="{text}\\nSentiment:")
    data.encode_task(task, enc, block_size=32, reserved=4)
    every = task.train + task.val + task.test
    assert task.truncated == sum(len(ex.input) > 100 for ex in every) > 0
    for ex in every:
        assert len(ex.input_ids) + len(ex.answer_ids) + 4 <= 32
        assert enc.decode(ex.input_ids).endswith("\nSentiment:")  # the end, with its cue, is kept


def test_user_files_give_one_line_errors_naming_the_line(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        task_files.load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        task_files.load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="'/dev/null' is not a regular file"):
        task_files.load_text("/dev/null")
    good = [dict(prompt=f"p{i}", completion=f" c{i}") for i in range(12)]
    task = load(write(tmp_path, "ok.jsonl", good[:6] + [""] + good[6:]))  # blank lines are fine
    assert [len(task.train), len(task.val), len(task.test)] == [9, 1, 2]
    cases = [('{"prompt": "x"}', "line 4: expected"), ('not json', "line 4: expected"),
             ('{"prompt": "  ", "completion": " y"}', "line 4: the prompt is empty"),
             ('{"text": "x", "label": 0.5}', "line 4: expected"), ('{"text": "x", "label": true}', "line 4")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            load(write(tmp_path, "bad.jsonl", good[:3] + [bad] + good[3:]))


def test_byte_order_marks_load_and_other_encodings_name_the_line(tmp_path):
    good = [dict(prompt=f"café {i}", completion=f" c{i}") for i in range(12)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x, ensure_ascii=False) for x in good).encode())
    assert len(load(str(path)).train) == 9
    latin = write(tmp_path, "latin.jsonl", [json.dumps(x, ensure_ascii=False) for x in good], encoding="latin-1")
    with pytest.raises(ValueError, match=r"latin.jsonl' is not UTF-8 text: line 1 "):
        load(latin)


def test_templates_hold_only_the_text_placeholder():
    for bad, shown in (("{text}\nTopic of {title}:", "'{title}'"), ("{{text}}:", "'{{'"), ("{text} }}", "'}}'")):
        with pytest.raises(ValueError, match=f"^--template may only hold the placeholder {{text}}; {shown}"):
            data.TaskOptions(task="x.jsonl", template=bad)
    assert data.TaskOptions(task="x.jsonl", template="Q: {text}\nA:").template == "Q: {text}\nA:"


def test_overlapping_splits_are_counted_and_a_split_inside_another_is_refused(tmp_path):
    lines = [dict(text=f"review number {i}", label=["good", "bad"][i % 2]) for i in range(40)]
    train = write(tmp_path, "train.jsonl", lines)
    with pytest.raises(ValueError, match=r"^every test example is also in train or val \(.*train.jsonl, .*train.jsonl\)"):
        load(train, test=train)  # the same file twice
    test = write(tmp_path, "test.jsonl", lines[:3] + [dict(text="unseen", label="good")] * 3)
    task = load(train, test=test)
    assert any(line.endswith("3 of 6 test examples are in train or val too (the same input and answer)")
               for line in task.describe())
    with pytest.raises(ValueError, match=r"^every test example is also in train or val"):
        load(train, val=test, test=test)


def test_text_label_lines_whose_labels_are_too_rare_are_refused_with_their_counts(tmp_path):
    lines = [dict(text=f"line {i}", label="good" if i < 30 else f"odd{i}") for i in range(32)]
    with pytest.raises(ValueError, match=r"labels with fewer than 3 lines: 'odd30' 1, 'odd31' 1; add lines, or pass "
                                         r"--metric exact_match"):
        load(write(tmp_path, "t.jsonl", lines))
    assert load(write(tmp_path, "t.jsonl", lines), metric="exact_match").choices is None  # asked for: used


def test_the_split_does_not_move_with_the_training_seed(tiny_out, reviews):
    import train
    from conftest import TINY_ARGS
    from kit import bases, options

    def test_split(seed):
        args = train.parse([*TINY_ARGS, "--out-dir", tiny_out, "--task", reviews, "--seed", str(seed)])
        base = bases.our_base(args.base_opts, "tiny", args.out_dir, args.task_opts.people)
        return [ex.input for ex in train.checked(args, "prompt", base, bases.tokenizer_of(base)).task.test]
    assert test_split(1) == test_split(2)
