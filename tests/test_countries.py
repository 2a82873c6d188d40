"""The countries task (kit.get_data, for proxy tuning's premise that a larger model knows more): every country's
facts in one split only, so that a test answer can only come from what the model knew before tuning."""
from kit import data
from kit.get_data import country_splits


def records(n):
    return [dict(name=dict(common=f"Land{i}"), capital=[f"City{i}"] if i % 7 else ["A", "B"],
                 currencies={"X": dict(name=f"Coin{i}")} if i % 5 else {"X": {"name": "a"}, "Y": {"name": "b"}})
            for i in range(n)]


def test_no_country_is_in_two_splits_and_every_single_answer_is_kept():
    splits = country_splits(records(100))
    countries = {s: {r["prompt"].split(" -> ")[0] for r in rows} for s, rows in splits.items()}
    assert not countries["train"] & countries["val"] and not countries["train"] & countries["test"]
    assert not countries["val"] & countries["test"]
    # 97 countries have a fact with one answer (Land0, 35 and 70 have none): 50/15/35 of them
    assert [len(countries[s]) for s in ("train", "val", "test")] == [48, 15, 34]
    rows = [r for s in splits.values() for r in s]
    # a relation with two answers (a second capital, a second currency) has no row: exact match needs one
    assert len(rows) == 2 * 100 - len([i for i in range(100) if not i % 7]) - len([i for i in range(100) if not i % 5])
    assert {"prompt": "Land1 -> capital:", "completion": " City1"} in rows
    assert country_splits(records(100)) == splits  # a fixed seed: the same split every time


def test_the_task_folder_reads_as_a_generation_task(tmp_path):
    import json
    for split, rows in country_splits(records(40)).items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = data.load_task(data.TaskOptions(task=str(tmp_path)))
    assert not task.choices and task.metric == "exact_match" and len(task.test) > 0
