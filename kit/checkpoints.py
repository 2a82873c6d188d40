"""
Files on disk: written whole or not at all, and checked when read back.

Every file is written aside and renamed, with the user's umask; a run's folder
(ckpt.pt + metrics.json) is written aside as a whole and renamed, so an interrupted run or a full
disk leaves each folder complete or absent, and one line names the file. A checkpoint holds only the
trained tensors, the options that rebuild them, and a record of everything its score depends on: the
base's identity (weights, config, tokenizer), the task's token ids, and a hash of its own tensors.
--load refuses, naming it, whatever changed (the base's part of that is bases.find, the rest
train.load_run).

    checkpoints.save_file(obj, path)                 # .json, bytes, or torch.save; atomic
    checkpoints.write_run(folder, ckpt, metrics)     # both files, or neither
    ckpt = checkpoints.read_run("out/runs/.../ckpt.pt")
"""
import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

FORMAT = 3  # of ckpt.pt: the checks below need every field it records


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cannot_write(path, e):
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
    return ValueError(f"could not write {path}: {why}; nothing half-written was kept")


def save_file(obj, path, replace=True):
    """Write aside, then rename: never a half-written file, even when interrupted or when the disk
    fills. replace=False keeps a file that another run wrote first (and returns False)."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=aside(os.path.basename(path)),
                                   suffix=MARK)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, bytes):
                f.write(obj)
            elif path.endswith(".json"):
                f.write(json.dumps(finite(obj), indent=1).encode())
            else:
                torch.save(obj, f)
        # mkstemp makes 0600 files; ours are as readable as the user's
        os.chmod(tmp, 0o666 & ~umask())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            # fails if the file exists: a base that runs depend on is never replaced
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finite(obj):  # JSON has no NaN or infinity: a diverged value is written as null
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


MARK = ".kit-aside.tmp"  # the end of every name we write aside: only those are ever cleaned up


_HELD = {}  # out-dir -> [its open lock file, how many of this process' callers hold it]


@contextlib.contextmanager
def writer(out_dir):
    """The one process writing to `out_dir`: a second train.py or compare.py on the same folder is
    refused in one line instead of racing this one. The lock is the kernel's (flock), so a killed
    run leaves none behind; then what killed runs left aside is cleaned."""
    if out_dir not in _HELD:
        f = open(os.path.join(out_dir, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise ValueError(f"another train.py or compare.py (pid {pid}) is writing to {out_dir}: "
                             f"wait for it to finish, or give another --out-dir") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        _HELD[out_dir] = [f, 0]
        clean_stale(out_dir)
    _HELD[out_dir][1] += 1
    try:
        yield
    finally:
        _HELD[out_dir][1] -= 1
        if not _HELD[out_dir][1]:
            _HELD.pop(out_dir)[0].close()  # closing the file releases the lock


def aside(name):
    """The start of the name a file is written under before it is renamed: hidden, and with the
    writing process' id, so that what a killed run left can be told from what a live one writes."""
    return f".{name}.{os.getpid()}."


def clean_stale(out_dir):
    """Remove what killed runs left: only names that save_file and write_run make (.NAME.PID.*
    ending in MARK) whose process no longer exists; nothing else of yours under --out-dir."""
    for root, dirs, files in os.walk(out_dir):
        for name in dirs + files:
            m = re.fullmatch(r"\..+\.(\d+)\.[^.]*" + re.escape(MARK), name)
            if m and not alive(int(m.group(1))):
                path = os.path.join(root, name)
                (shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path)
                 else os.remove(path))


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------------------------------
# Runs: a folder per set of options, holding ckpt.pt (only the trained tensors) and metrics.json

def code_digest(folder=ROOT):
    """The project's own source files, the top level's and kit/'s: a run is reused only by the code
    that made it (homework edits it)."""
    h = hashlib.sha256()
    names = glob.glob("*.py", root_dir=folder) + glob.glob("kit/*.py", root_dir=folder)
    for name in sorted(names):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def digest(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_dir(out_dir, key):
    """Everything a run's result depends on is in `key`; equal keys, same folder, so finished runs
    can be reused."""
    name = (f"{key['task']}-{key['base']}-{key['method']}"
            f"{'-classifier' if key['train'].get('classifier') else ''}")
    return os.path.join(out_dir, "runs", f"{name}-{digest(key)}")


def write_run(folder, ckpt, metrics):
    """ckpt.pt and metrics.json into `folder`, both or neither: written in a folder aside, then
    renamed. metrics gets the checkpoint's size (ckpt_bytes). Returns the metrics as written."""
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=aside(name), suffix=MARK)
        os.chmod(tmp, 0o777 & ~umask())
    except OSError as e:
        raise cannot_write(folder, e) from None
    try:
        save_file(ckpt, os.path.join(tmp, "ckpt.pt"))
        metrics = dict(metrics, ckpt_bytes=os.path.getsize(os.path.join(tmp, "ckpt.pt")))
        metrics["seal"] = seal(metrics)
        save_file(metrics, os.path.join(tmp, "metrics.json"))
        old = os.path.join(parent, f"{aside(name)}old{MARK}")
        if os.path.exists(folder):  # a rerun of the same options: the new folder replaces the old
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except ValueError as e:  # save_file's one line, about the folder aside: name the real one
        raise ValueError(str(e).replace(tmp, folder)) from None
    except OSError as e:
        raise cannot_write(folder, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def seal(metrics):
    """A hash of a run's metrics as JSON holds them (where the folder is left out: it may move)."""
    body = {k: v for k, v in metrics.items() if k not in ("seal", "run_dir")}
    return hashlib.sha256(json.dumps(json.loads(json.dumps(finite(body))),
                                     sort_keys=True).encode()).hexdigest()[:16]


def read_metrics(folder, checkpoint=True):
    """A finished run's metrics.json, checked before it is reused: the very numbers the run wrote,
    beside the checkpoint it wrote with them (proxy tuning's scores have none of their own)."""
    path, ckpt = os.path.join(folder, "metrics.json"), os.path.join(folder, "ckpt.pt")
    fix = f"delete the folder {folder} to train the run again"
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}): {fix}") from None
    if not isinstance(metrics, dict) or metrics.get("seal") != seal(metrics):
        raise ValueError(f"{path} was edited or damaged since its run wrote it: {fix}")
    if checkpoint and (not os.path.isfile(ckpt)
                       or os.path.getsize(ckpt) != metrics.get("ckpt_bytes")):
        raise ValueError(f"{ckpt} is missing or is not the checkpoint written with "
                         f"{path}: {fix}")
    return metrics


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


def read_file(path, what, fix):
    """torch.load of our own files (plain tensors and values only: no code runs), with one-line
    errors."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file written by train.py")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path!r} is not a file written by train.py, or it is damaged "
                         f"({type(e).__name__}): {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path!r} is not a file written by train.py: {fix}")
    return obj


def read_run(path):
    """A checkpoint, checked: a file of ours, of this format, with the very tensors it was saved
    with."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} not found: train one first (it is written as "
                         "runs/.../ckpt.pt)")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder: give the ckpt.pt inside it")
    ckpt = read_file(path, "checkpoint", "give a ckpt.pt written by train.py")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} was written by an older train.py and lacks what --load checks: "
                         f"train it again")
    if (not isinstance(ckpt.get("trainable"), dict)
            or tensors_digest(ckpt["trainable"]) != ckpt.get("tensors")):
        raise ValueError(f"{path} is damaged: its tensors are not the ones it was saved with")
    check_keys(ckpt, SCHEMA, path)
    return ckpt


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
