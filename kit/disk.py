"""
Files on disk: written whole or not at all, never over what you wrote, and read back with one-line
errors; the --out-dir's one writer; a run's folder, named by a digest of everything its result
depends on.

Every file is written aside and renamed, with the user's umask, never over a link or a folder, so an
interrupted run or a full disk leaves no half file, and one line names the file. A second train.py
or compare.py on the same --out-dir is refused in one line instead of racing the first, and what
killed runs left aside in it is cleaned (only that). What a run's folder holds (ckpt.pt and
metrics.json) and how --load checks it: kit/checkpoints.py.

    disk.save_file(obj, path)                      # .json, bytes, or torch.save; atomic
    with disk.writer(cmd.out_dir):                 # refused if another process holds it
        folder = disk.run_dir(cmd.out_dir, key)    # out/runs/<task>-<base>-<method>-<digest>
"""
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile

import torch

from kit import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cannot_write(path, e):
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full"
    elif isinstance(e, OSError):
        why = e.strerror or str(e)
    else:  # torch.save's own error for a failed write ("[enforce fail at inline_container.cc]")
        why = f"torch.save failed ({str(e).splitlines()[0][:80]}): is the disk full?"
    return ValueError(f"could not write {path}: {why}; nothing half-written was kept")


def os_error(e):
    """An OSError that no check foresaw, as the entry points print it: one line naming the file."""
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        why += " (a file is in the way of that path: move it away)"
    return f"error: {e.filename}: {why}" if e.filename else f"error: {why}"


@contextlib.contextmanager
def one_line_errors():
    """How the entry points (train.py, compare.py, kit.get_data) end on our errors, on an OSError no
    check foresaw and on Ctrl-C: one line, never a traceback; under torchrun, rank 0's line
    alone."""
    try:
        yield
    except ValueError as e:  # our errors say what to do; a traceback would bury that
        raise SystemExit(f"error: {e}" if distributed.is_main() else 1)
    except OSError as e:
        raise SystemExit(os_error(e) if distributed.is_main() else 1)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was kept", file=sys.stderr)
        raise SystemExit(130)


def in_the_way(path, folder=False):
    """Refuse, in one line, a link, or a folder (a file, for folder=True), where the project writes
    a file (a folder): what is there is yours, and is never replaced, moved or deleted."""
    if os.path.islink(path):
        what = "a link"
    elif not os.path.exists(path) or (os.path.isdir(path) if folder else os.path.isfile(path)):
        return
    else:
        what = ("a folder" if os.path.isdir(path) else "a file" if os.path.isfile(path)
                else "a special file")
    kind = "folder" if folder else "file"
    raise ValueError(f"{path} is {what}, where the project writes a {kind} of that name: move it "
                     f"away (what you wrote is never replaced)")


def save_file(obj, path, replace=True):
    """Write aside, then rename: never a half-written file, even when interrupted or when the disk
    fills, and never over a link or a folder. replace=False keeps a file that another run wrote
    first (and returns False)."""
    path = os.fspath(path)
    in_the_way(path)
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
    except (OSError, RuntimeError) as e:
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


# the end of every name we write aside: only those are ever cleaned up (writer)
MARK = ".kit-aside.tmp"


def aside(name):
    """The start of the name a file is written under before it is renamed: hidden, and with the
    writing process' id, so that what a killed run left can be told from what a live one writes."""
    return f".{name}.{os.getpid()}."


# --------------------------------------------------------------------------------------------------
# A run's folder, named by what its result depends on

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
    folder = os.path.join(out_dir, "runs", f"{name}-{digest(key)}")
    run_files(folder)  # before the run trains: what is in the way is refused now
    return folder


def run_files(folder):
    """{name: path} of the two files a run writes in its folder (it touches nothing else there),
    with a link or a file at the folder's name, or a link or a folder at theirs, refused."""
    in_the_way(folder, folder=True)
    files = {name: os.path.join(folder, name) for name in ("ckpt.pt", "metrics.json")}
    for path in files.values():
        in_the_way(path)
    return files


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # 16 MB at a time: a 6 GB model never sits in memory
            h.update(chunk)
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------------
# The --out-dir's one writer

_HELD = {}  # out-dir -> [its lock file's descriptor, how many of this process' callers hold it]
LOCKED_BY = "train.py or compare.py writes here: pid "  # what our .lock holds, so that a .lock
                                                        # of another tool's is never overwritten


@contextlib.contextmanager
def writer(out_dir):
    """The one process writing to `out_dir`: a second train.py or compare.py on the same folder is
    refused in one line instead of racing this one. The lock is the kernel's (flock), so a killed
    run leaves none behind; then what killed runs left aside is cleaned."""
    if out_dir not in _HELD:
        _HELD[out_dir] = [lock(out_dir), 0]
        # what killed runs left: only names that save_file and write_run make (.NAME.PID.* ending in
        # MARK) whose process no longer exists; nothing else of yours under --out-dir
        for root, dirs, files in os.walk(out_dir):
            for name in dirs + files:
                m = re.fullmatch(r"\..+\.(\d+)\.[^.]*" + re.escape(MARK), name)
                if m and not alive(int(m.group(1))):
                    path = os.path.join(root, name)
                    (shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path)
                     else os.remove(path))
    _HELD[out_dir][1] += 1
    try:
        yield
    finally:
        _HELD[out_dir][1] -= 1
        if not _HELD[out_dir][1]:
            os.close(_HELD.pop(out_dir)[0])  # closing the file releases the lock


def lock(out_dir):
    """`out_dir`/.lock, opened without following a link, locked, and holding our pid: a link, a
    folder, a file we cannot write or one that another tool wrote is refused, never truncated."""
    path = os.path.join(out_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        what = {errno.ELOOP: "a link", errno.EISDIR: "a folder"}.get(
            e.errno, f"a file that cannot be written ({e.strerror})")
        raise ValueError(f"{path} is {what}: train.py and compare.py keep their lock in a file of "
                         f"that name; move it away, or give another --out-dir") from None
    try:
        held = os.pread(fd, 200, 0).decode(errors="replace").strip()
        # empty: new; a bare pid: an older train.py's lock
        if not stat.S_ISREG(os.fstat(fd).st_mode) or held and not (
                held.startswith(LOCKED_BY) or held.isdigit()):
            raise ValueError(f"{path} is not the lock of train.py: it is never overwritten; move "
                             f"it away, or give another --out-dir")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another train.py or compare.py (pid "
                             f"{held.removeprefix(LOCKED_BY) or '?'}) is writing to {out_dir}: "
                             f"wait for it to finish, or give another --out-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{LOCKED_BY}{os.getpid()}\n".encode(), 0)
        except OSError as e:
            raise cannot_write(path, e) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
