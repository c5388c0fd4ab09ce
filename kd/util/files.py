"""Files written whole or not at all (a temporary file of their own, then a rename), and
folders replaced so that one complete copy always exists."""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """A file written whole or not at all, through a temporary file of its own (two processes may
    write the same path at once), then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes 0600 files
        os.replace(handle.name, path)
    except BaseException:  # a full disk: no half-written temporary left behind
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_dir_atomic(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final`: at every moment one complete copy exists
    (`final`, or `final.old` for the instant between the two renames)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def existing_dir(final: Path) -> Optional[Path]:
    """The complete copy of a folder written by replace_dir_atomic, if any."""
    old = final.with_name(final.name + ".old")
    return final if final.exists() else (old if old.exists() else None)
