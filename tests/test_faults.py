"""A run folder has one owner, and a failed write leaves it as it was before that write: every
write of a run fails in turn (as a full disk fails it), then the run continues; a second run into
a busy folder, a read-only folder, a real full file system, an interrupted export's leftovers."""

import errno
import fcntl
import io
import json
import os
import shutil
import subprocess
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_script, script_command

FLAGS = ["--model", "cifar_resnet8", "--epochs", "2", "--batch-size", "32", "--val-size", "32", "--report-to", "none", "--lr", "0.05"]
TEMPORARY = ("checkpoint.tmp", ".export.")  # plus any other name starting with "."


def one_line_error(result, code):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def _files(folder: Path):
    """The run folder's files, relative, its lock left out."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and path.name != ".lock")


def _temporary(name: str) -> bool:
    return name.startswith(TEMPORARY) or Path(name).name.startswith(".")


def _state(folder: Path):
    """(the folder's files, the checkpoint's epoch, history.jsonl's epochs), temporaries left out."""
    state, history = folder / "checkpoint" / "trainer_state.json", folder / "history.jsonl"
    epochs = [json.loads(line)["epoch"] for line in history.read_text().splitlines()] if history.exists() else []
    return ([name for name in _files(folder) if not _temporary(name)],
            json.loads(state.read_text())["epoch"] if state.exists() else None, epochs)


def _whole(folder: Path):
    """_state of a folder that must hold no temporaries and only whole files (each one parses)."""
    from PIL import Image
    from safetensors.torch import load_file

    assert not [name for name in _files(folder) if _temporary(name)], _files(folder)
    for name in _files(folder):
        path = folder / name
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix in (".bin", ".pkl"):  # torch.save's zip archive
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None, name
        elif path.suffix == ".png":
            Image.open(path).verify()
    return _state(folder)


def _weights(folder: Path):
    from safetensors.torch import load_file

    return {name: tensor.tolist() for name, tensor in load_file(folder / "model.safetensors").items()}


def _final_name(written: Path) -> str:
    """Where a write lands once renamed: checkpoint.tmp/X -> checkpoint/X, .export.*/X -> X, an
    atomic write's temporary .NAME.random[.png] -> NAME."""
    name = ".".join(written.name[1:].split(".")[:2]) if written.name.startswith(".") else written.name
    return f"checkpoint/{name}" if written.parts[0] == "checkpoint.tmp" else name


def _full_disk():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Writes:
    """Every function that writes a run's bytes, wrapped wherever it is bound (aliases such as
    accelerate's `safe_save_file` included): its calls that write into `folder` are listed with
    the folder's state before each, and the call numbered `fail_at` writes half of its bytes and
    fails as that function does on a full disk."""

    def __init__(self, monkeypatch, folder: Path, fail_at=None):
        import json as json_module
        import sys

        import matplotlib.figure
        import safetensors
        import safetensors.torch

        self.folder, self.fail_at, self.calls, self.before = Path(folder).resolve(), fail_at, [], []
        save, save_file, copy2, savefig, dump, fsync = (torch.save, safetensors.torch.save_file, shutil.copy2,
                                                        matplotlib.figure.Figure.savefig, json_module.dump, os.fsync)

        def serialized(obj) -> bytes:
            buffer = io.BytesIO()
            save(obj, buffer)
            return buffer.getvalue()

        def half(path, data: bytes) -> None:
            Path(path).write_bytes(data[: len(data) // 2])

        def as_path(value):
            return value if isinstance(value, (str, os.PathLike)) else None

        # (function, the path it writes, what it leaves on a full disk, what it raises there: as
        # seen on a full 256 kB tmpfs, 2026-12-04, 2-core AMD EPYC)
        writers = [
            (save, lambda obj, f, *a, **k: as_path(f), lambda obj, f, *a, **k: half(f, serialized(obj)),
             lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
            (save_file, lambda tensors, filename, *a, **k: filename, lambda tensors, filename, *a, **k: half(filename, safetensors.torch.save(tensors)),
             lambda: safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
            (copy2, lambda src, dst, *a, **k: dst, lambda src, dst, *a, **k: half(dst, Path(src).read_bytes()), _full_disk),
            (savefig, lambda figure, fname, *a, **k: as_path(fname), lambda figure, fname, *a, **k: half(fname, b"\x89PNG\r\n\x1a\n" * 64), _full_disk),
            (dump, lambda obj, fp, *a, **k: as_path(getattr(fp, "name", None)), lambda obj, fp, *a, **k: fp.write(json_module.dumps(obj)[:20]),
             _full_disk),
            # kd.train.export.write_bytes_atomic's last step before its rename (its data is written): a full disk fails there at the latest
            (fsync, lambda fd: os.readlink(f"/proc/self/fd/{fd}"), lambda fd: None, _full_disk),
        ]
        replacements = {original: self._wrap(original, *rest) for original, *rest in writers}
        import kd.cli  # noqa: F401  every module a run imports, so that each binds the functions before they are wrapped
        with warnings.catch_warnings():  # some modules' attributes warn that they are deprecated when looked at
            warnings.simplefilter("ignore")
            for module in list(sys.modules.values()):
                for name, value in list(getattr(module, "__dict__", {}).items()):
                    if isinstance(value, types.FunctionType):  # a module imported while another test's wrapper was in place holds that wrapper
                        value = value.__dict__.get("wrapped_writer", value)
                    try:
                        replacement = replacements.get(value)
                    except TypeError:  # unhashable
                        continue
                    if replacement is not None:
                        monkeypatch.setattr(module, name, replacement)
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", replacements[savefig])

    def _wrap(self, original, path_of, leave_half, failure):
        def wrapper(*args, **kwargs):
            path = path_of(*args, **kwargs)
            if path is None or not Path(path).resolve().is_relative_to(self.folder):
                return original(*args, **kwargs)
            self.calls.append(Path(path).resolve().relative_to(self.folder))
            self.before.append(_state(self.folder))
            if len(self.calls) - 1 != self.fail_at:
                return original(*args, **kwargs)
            leave_half(*args, **kwargs)
            raise failure()
        wrapper.wrapped_writer = original
        return wrapper


def _train(dataset, out, *extra):
    from kd.cli import train

    return train.__wrapped__("student", ["--dataset", str(dataset), "--output-dir", str(out), *FLAGS, *extra])


@pytest.mark.slow  # 19 failed runs, each continued
def test_every_write_of_a_run_fails_in_turn_and_the_run_continues(tiny_dataset, tmp_path, monkeypatch):
    """For each write a run makes (checkpoint parts, kept weights, trainer state, history,
    run config, export, figures, model card, metrics), in turn: that write fails half-way, the run
    stops with one line, its folder is exactly as it was before that write (every file whole, no
    temporaries), and the run continues from there (--resume where a checkpoint was saved) to the
    same metrics as a run that never failed."""
    from kd.errors import RunError

    clean = tmp_path / "clean"
    with monkeypatch.context() as patch:
        recorded = Writes(patch, clean)
        expected = _train(tiny_dataset, clean)
    final = _whole(clean)
    # every file of the run was made by a write the test wraps (a new kind of write would go untested)
    assert final[0] == sorted({_final_name(path) for path in recorded.calls}), recorded.calls
    assert len(recorded.calls) == 19, recorded.calls  # run config, 2 x 6 per epoch (checkpoint's 5 files, history), 6 to finish

    for index, path in enumerate(recorded.calls):
        out = tmp_path / f"fault{index}"
        with monkeypatch.context() as patch:
            Writes(patch, out, fail_at=index)
            with pytest.raises(RunError) as stopped:
                _train(tiny_dataset, out)
        message = str(stopped.value)
        assert "\n" not in message and str(out) in message, (path, message)
        assert _whole(out) == recorded.before[index], (index, path, message)
        resumed = _train(tiny_dataset, out, *(["--resume"] if (out / "checkpoint").exists() else []))
        assert resumed == expected and _whole(out)[0] == final[0], (index, path)
        assert _weights(out) == _weights(clean), (index, path)  # the same run, as if nothing had failed
        shutil.rmtree(out)


def test_a_second_run_into_a_busy_folder_is_refused_before_it_loads_data(tmp_path):
    """A folder another live process holds (its lock, flock) is refused in one line, before the
    data set is read (here: one that does not exist) and with nothing in the folder touched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".export.abc").mkdir()  # the holder's export in progress: not a stale one to clear
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_script("train_student.py", "--dataset", tmp_path / "no-such-data", "--output-dir", out, *FLAGS, check=False)
    assert one_line_error(result, 2) == f"error: {out} is in use by another run; wait for it to end or pass another --output-dir"
    assert (out / ".export.abc").is_dir()


@pytest.mark.slow  # two runs at once
def test_two_runs_started_at_once_into_one_folder(tiny_dataset, tmp_path):
    """Both once exited 0 and the folder held a mix of the two: now one trains, and the other is
    refused in one line (in use, or already holding a run if the first was that quick)."""
    out = tmp_path / "run"
    started = []
    for seed in ("1", "2"):
        command, env = script_command("train_student.py", "--dataset", tiny_dataset, "--output-dir", out, *FLAGS, "--seed", seed)
        started.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in started]
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    winner, loser = sorted(results, key=lambda r: r.returncode)
    line = one_line_error(loser, 2)
    assert "is in use by another run (process" in line or "already holds a run" in line, line
    seed = json.loads((out / "run_config.json").read_text())["train"]["seed"]
    assert f"--seed {seed}" in " ".join(winner.args) and _whole(out)[1] == 2


def _mount(*args) -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write: chmod where permissions apply; as root (which they
    do not stop) a read-only bind mount, or a skip where mounting is not allowed."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not _mount("--bind", str(folder), str(folder)):
        pytest.skip("root without mount: no way to make a folder read-only for this process")
    try:
        if not _mount("-o", "remount,bind,ro", str(folder)):
            pytest.skip("root without a read-only remount")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_folder_is_refused_before_it_loads_data(read_only_folder, tmp_path):
    result = run_script("train_student.py", "--dataset", tmp_path / "no-such-data", "--output-dir", read_only_folder / "run",
                        *FLAGS, check=False)
    assert one_line_error(result, 2).startswith(f"error: cannot write in the run folder {read_only_folder / 'run'} (")
    result = run_script("train_student.py", "--dataset", tmp_path / "no-such-data", "--output-dir", read_only_folder, *FLAGS, check=False)
    assert "make it writable or pass another --output-dir" in one_line_error(result, 2)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB file system (tmpfs): room for one checkpoint of cifar_resnet8 (about 1 MB), not
    for the next one written beside it. Root only (mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)):
        pytest.skip("no tmpfs mount here (root and mount needed)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tiny_dataset, small_disk):
    """It once ended in "RuntimeError: basic_ios::clear: iostream error" with checkpoint.tmp
    left behind; then --resume, once there is room, finishes the run."""
    out = small_disk / "run"
    result = run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", out, *FLAGS, "--epochs", "3", check=False)
    line = one_line_error(result, 1)
    assert line.startswith(f"error: no space left to write the checkpoint in {out}: it needs about ") and line.endswith(
        " are; free some space there; the last good checkpoint (epoch 1) is kept: --resume continues from it"), line
    files, epoch, history = _whole(out)
    assert epoch == 1 and history == [1] and not (out / "checkpoint.tmp").exists()
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", out, *FLAGS, "--epochs", "3", "--resume")
    assert _whole(out)[1:] == (3, [1, 2, 3]) and (out / "metrics.json").is_file()


def test_an_interrupted_exports_leftovers_are_cleared(tiny_dataset, tmp_path):
    """A SIGTERM during the export left a .export.* staging folder that --overwrite never cleared:
    a run that owns the folder clears the temporaries a killed run left there."""
    out = tmp_path / "run"
    _train(tiny_dataset, out, "--epochs", "1")
    (out / ".export.k1ll3d").mkdir()
    (out / ".export.k1ll3d" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoint.tmp").mkdir()
    (out / ".metrics.json.x7y8z9").write_text("{")
    (out / "notes.txt").write_text("the user's own")  # not a run file: stays
    _train(tiny_dataset, out, "--epochs", "1", "--overwrite")
    assert _whole(out)[1] == 1 and (out / "notes.txt").is_file()
