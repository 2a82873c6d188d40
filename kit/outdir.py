"""
The --out-dir's one writer: a second train.py or compare.py on the same folder is refused in one
line instead of racing the first, and what killed runs left aside in it is cleaned (only that).

    with outdir.writer(cmd.out_dir):    # refused if another process holds it
        ...
"""
import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat

from kit.checkpoints import MARK, cannot_write


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
        clean_stale(out_dir)
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
