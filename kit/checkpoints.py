"""
A run's two files: ckpt.pt (only the trained tensors, the options that rebuild them, and a record of
everything its score depends on: the base's identity (weights, config, tokenizer), the task's token
ids, a hash of every tensor scoring uses) and metrics.json, written last, bound to the checkpoint by
its sha256 and to the run by its options. A finished run is reused only when it checks out, and
--load refuses, naming it, whatever changed (the base's part of that is bases.find, the rest
train.load_run). How each file is written (aside, then renamed): kit/disk.py.

    checkpoints.write_run(folder, ckpt, metrics)     # ckpt.pt, then metrics.json
    ckpt = checkpoints.read_run("out/runs/.../ckpt.pt")
"""
import dataclasses
import hashlib
import json
import os

import torch

from kit import disk, task_files

FORMAT = 4  # of ckpt.pt: the checks below need every field it records


# --------------------------------------------------------------------------------------------------
# Runs: a folder per set of options, holding ckpt.pt (only the trained tensors) and metrics.json

def write_run(folder, ckpt, metrics):
    """ckpt.pt and metrics.json into `folder` (made if missing); whatever else it holds is kept.
    The checkpoint gets the hash of every tensor scoring uses (tensors) and the code's digest; it is
    written aside; then the old metrics.json goes, the checkpoint is renamed into place, and
    metrics.json, bound to it by its sha256 (and to the run by its options), comes last: a folder
    without metrics.json is an unfinished run, never reused. Returns the metrics as written."""
    files = disk.run_files(folder)
    made = not os.path.isdir(folder)
    staged = os.path.join(folder, f"{disk.aside('ckpt.pt')}new{disk.MARK}")
    done, ckpt = False, dict(ckpt, tensors=tensors_digest(scored(ckpt)), code=disk.code_digest())
    try:
        os.makedirs(folder, exist_ok=True)
        disk.save_file(ckpt, staged)
        metrics = dict(metrics, ckpt_bytes=os.path.getsize(staged),
                       ckpt_sha256=disk.sha256_of(staged),
                       tensors=ckpt["tensors"])
        metrics["seal"] = seal(metrics)
        if os.path.exists(files["metrics.json"]):  # a rerun: never the old record beside the new
            os.remove(files["metrics.json"])
        os.replace(staged, files["ckpt.pt"])
        disk.save_file(metrics, files["metrics.json"])
        done = True
    except ValueError as e:  # save_file's one line, about the file aside: name the real one
        raise ValueError(str(e).replace(staged, files["ckpt.pt"])) from None
    except OSError as e:
        raise disk.cannot_write(folder, e) from None
    finally:
        if os.path.exists(staged):
            os.remove(staged)
        if made and not done:  # a folder of our own, left as it was: absent
            if os.path.isfile(files["ckpt.pt"]):
                os.remove(files["ckpt.pt"])
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
    return metrics


def seal(metrics):
    """A hash of a run's metrics as JSON holds them (where the folder is left out: it may move)."""
    body = {k: v for k, v in metrics.items() if k not in ("seal", "run_dir")}
    return hashlib.sha256(json.dumps(as_json(body), sort_keys=True).encode()).hexdigest()[:16]


def read_metrics(folder, options=None, checkpoint=True):
    """A finished run's metrics.json, checked before it is reused: the very numbers the run wrote
    (sealed), written by a run of these options (the key its folder is named by), beside the very
    checkpoint it was written with (its sha256; proxy tuning's scores have none of their own)."""
    path, ckpt = os.path.join(folder, "metrics.json"), os.path.join(folder, "ckpt.pt")
    fix = f"delete the folder {folder} to train the run again"
    try:
        with open(path, "rb") as f:
            metrics = task_files.loads(f.read(), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}): {fix}") from None
    if not isinstance(metrics, dict) or metrics.get("seal") != seal(metrics):
        raise ValueError(f"{path} was edited or damaged since its run wrote it: {fix}")
    differ = [] if options is None else differences(metrics.get("options"), as_json(options))
    if differ:
        raise ValueError(f"{path} was written by another run (its {differ[0]} differs from this "
                         f"run's): {fix}")
    if checkpoint and (not os.path.isfile(ckpt)
                       or disk.sha256_of(ckpt) != metrics.get("ckpt_sha256")):
        raise ValueError(f"{ckpt} is missing or is not the checkpoint written with "
                         f"{path}: {fix}")
    return metrics


def as_json(obj):  # what a JSON file holds of obj (tuples become lists)
    return json.loads(json.dumps(disk.finite(obj)))


def differences(a, b, where=""):
    """The keys at which two JSON values differ, dotted ("train.lr")."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [where.rstrip(".") or "options"] if a != b else []
    return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k),
                                                                     f"{where}{k}.")]


def finished(folder, options):
    """The checked metrics of the finished run of `options` in `folder`, or None if it has none."""
    if os.path.exists(os.path.join(folder, "metrics.json")):
        return read_metrics(folder, options)
    return None


def recorded(cls, saved, what, path):
    """Options as a checkpoint recorded them, field for field what `cls` has now: a field added to
    or removed from a Config since (homework edits them) is named, never filled by a default."""
    now = {f.name for f in dataclasses.fields(cls) if f.init}
    for name in sorted(now ^ set(saved)):
        change = "has since been added to" if name in now else "is no longer one of"
        raise ValueError(f"{path}: the option {name!r} {change} {what} options: train the run "
                         f"again")
    try:
        return cls(**saved)
    except (TypeError, ValueError) as e:  # a value that today's checks refuse
        raise ValueError(f"{path}: its {what} options are refused now ({e}): train the run "
                         f"again") from None


def tensors_digest(tensors):
    """A hash of a checkpoint's tensors: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode()
                 + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_run(path):
    """A checkpoint, checked: a file of ours, of this format, with the very tensors it was saved
    with."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} not found: train one first (it is written as "
                         "out/runs/.../ckpt.pt)")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder: give the ckpt.pt inside it")
    ckpt = disk.read_file(path, "checkpoint", "give a ckpt.pt written by train.py")
    # format 3 hashed the trained tensors only: those without a classification layer hash alike
    if ckpt.get("format") != FORMAT and not (ckpt.get("format") == 3
                                             and ckpt.get("classifier") is None):
        raise ValueError(f"{path} was written by an older train.py and lacks what --load checks: "
                         f"train it again")
    check_keys(ckpt, SCHEMA, path)
    try:
        same = tensors_digest(scored(ckpt)) == ckpt["tensors"]
    except (AttributeError, TypeError, ValueError, RuntimeError):  # values that are not tensors
        same = False
    if not same:
        raise ValueError(f"{path} is damaged: its tensors are not the ones it was saved with")
    return ckpt


def scored(ckpt):
    """Every tensor that scoring a checkpoint uses, under one hash: the trained ones, and the
    classification layer's with its label ids."""
    tensors = dict(ckpt["trainable"])
    if ckpt["classifier"] is not None:
        tensors.update({f"classifier.{k}": v for k, v in ckpt["classifier"].items()})
        tensors["classifier.label_ids"] = torch.tensor(ckpt["classifier_labels"])
    return tensors


def loaded_note(path, ckpt):
    """--load's checks beyond the checkpoint itself: the metrics.json beside it must have been
    written with it (the same tensors, seed and training options: another run's checkpoint copied
    in is refused). Returns a note for the score's line when the project's code is not the run's."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(os.path.join(folder, "metrics.json")):
        metrics = read_metrics(folder, checkpoint=False)
        run = metrics.get("options") if isinstance(metrics.get("options"), dict) else {}
        differ = (["tensors"] if metrics.get("tensors", ckpt["tensors"]) != ckpt["tensors"] else
                  differences(run.get("train"), as_json(ckpt["train"]), "train."))
        if differ:
            raise ValueError(f"{path} is not the checkpoint that {folder}/metrics.json was written "
                             f"with (its {differ[0]} differs: another seed's or run's): put the "
                             f"run's own back, or train it again")
    code, now = ckpt.get("code"), disk.code_digest()
    if code and code != now:
        return (f" (note: the project's code is not the run's, {code} then and {now} now: the "
                f"score may differ from the run's own)")
    return ""


NONE = type(None)
# every key --load reads, and what it must hold
SCHEMA = dict(method=str, config=dict, trainable=dict, tensors=str, classifier=(dict, NONE),
              classifier_labels=(list, NONE), train=dict(seed=int, dtype=str),
              base=dict(spec=dict, relative=str, identity=dict, tokenizer=str),
              task=dict(options=dict, data=str))


def check_keys(obj, schema, path, where=""):
    """One line for the first key that is missing or holds the wrong type."""
    for key, kind in schema.items():
        name = f"{where}{key}"
        if key not in obj:
            raise ValueError(f"{path} is damaged: it has no {name!r}; train it again")
        if isinstance(kind, dict):
            if not isinstance(obj[key], dict):
                raise ValueError(f"{path} is damaged: its {name!r} is a "
                                 f"{type(obj[key]).__name__}, not a dict; train it again")
            check_keys(obj[key], kind, path, name + ".")
        elif not isinstance(obj[key], kind) or isinstance(obj[key], bool) and kind is int:
            raise ValueError(f"{path} is damaged: its {name!r} is a {type(obj[key]).__name__}; "
                             f"train it again")
