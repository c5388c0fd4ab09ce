"""A run folder has one owner: the live run that holds its lock. The folder is claimed before
anything is loaded (a second run into it, or a folder that cannot be written, stops at start in
one line), the temporaries a killed run left there are cleared, and a write that fails (a full
disk, a folder made read-only mid-run) ends in one line that names the folder and what it needs."""

import contextlib
import errno
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable, Optional, Sequence

from kd.errors import RunError, UsageError

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock
    fcntl = None

LOCK = ".lock"  # inside the folder: the folder carries its owner (kd.lab.scheduler's FOLDER.lock sits beside it)
STAGING = ".export."  # kd.train.export's staging folders
# what a failed write can raise: OSError from Python's files, RuntimeError from torch.save's C++
# writer ("basic_ios::clear: iostream error" on a full disk), SafetensorError from safetensors
try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors: its errors are OSError/RuntimeError
    SafetensorError = RuntimeError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def claim(out: Path) -> Optional[IO]:
    """Make `out`, check that it can be written and lock it (flock, exclusive, held while the
    returned file is open and never longer than the process). None where the file system has no
    locks (a warning says that nothing then keeps a second run out)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a real write: os.access says yes to root on a read-only mount's files
            pass
        handle = open(out / LOCK, "a+")
    except OSError as error:
        raise UsageError(f"cannot write in the run folder {out} ({error.strerror or error}); "
                         "make it writable or pass another --output-dir") from None
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise UsageError(f"{out} is in use by another run{f' ({holder})' if holder else ''}; "
                         "wait for it to end or pass another --output-dir") from None
    except OSError as error:  # Lustre mounted without -o flock, NFS without a lock daemon
        print(f"warning: {out} is on a file system without file locks ({error.strerror}): "
              "nothing keeps a second run from writing into it", file=sys.stderr, flush=True)
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")  # for the refusal's message
    handle.flush()
    return handle


def clear_stale(out: Path, names: Sequence[str], tmp_folders: Sequence[str]) -> None:
    """Remove what a run killed mid-write left in `out` (call it holding the lock, so that no live
    run owns any of it): export staging folders, the folders named `tmp_folders` and the
    temporary files of atomic writes of the files named `names`."""
    out = Path(out)
    for path in out.glob(STAGING + "*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in tmp_folders:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in names:
        for path in out.glob(f".{name}.*"):  # kd.train.export.write_bytes_atomic's and save_png_atomic's temporaries
            if path.is_file():
                path.unlink(missing_ok=True)


def megabytes(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def free_bytes(folder: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_failed(what: str, folder: Path, error: BaseException, needed_bytes: int, kept: str) -> RunError:
    """The one line for a write of `what` into `folder` that failed with `error`; `needed_bytes`:
    about what the write takes; `kept`: what the run folder still holds whole, and how to go on."""
    folder = Path(folder)
    free = free_bytes(folder)
    code = getattr(error, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or os.strerror(errno.ENOSPC) in str(error)  # safetensors: no errno, its text
    if full or (free is not None and free < needed_bytes):  # torch.save's writer says neither ("unexpected pos")
        return RunError(f"no space left to write {what} in {folder}: it needs about {megabytes(needed_bytes)} free, "
                        f"{megabytes(free or 0)} are; free some space there; {kept}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RunError(f"cannot write {what} in {folder} ({error.strerror}); make it writable; {kept}")
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return RunError(f"could not write {what} in {folder} ({first}); {kept}")


@contextlib.contextmanager
def owned(out: Path, main: bool):
    """Hold `out` for the block: the main process claims it (see claim); the other processes of
    the same run hold nothing, so that they never refuse their own main process."""
    lock = claim(out) if main else None
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


@contextlib.contextmanager
def writing(what: str, folder: Path, needed_bytes: int, kept: Callable[[], str]):
    """A failed write in the block ends in write_failed's one line; `kept()` is asked then."""
    try:
        yield
    except WRITE_ERRORS as error:
        raise write_failed(what, folder, error, needed_bytes, kept()) from error
