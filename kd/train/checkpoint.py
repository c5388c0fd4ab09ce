"""Training state: accelerate's save_state (model as safetensors, optimizer and RNG states
loaded back with weights_only=True), the loop's own state as JSON, and the kept (best)
student weights, all in one folder swapped in atomically once complete."""

import json
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from kd.train.engine import TrainerState
from kd.errors import UsageError
from kd.util.files import existing_dir, replace_dir_atomic, write_json_atomic
from kd.train.rundir import WRITE_ERRORS, write_failed

STATE = "trainer_state.json"
KEPT = "kept_student.safetensors"


def _student_tensors(method) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in method.student.state_dict().items()}


def save(accelerator: Accelerator, method, state: TrainerState, folder: Path, keep_current: bool) -> None:
    """Write the state into folder.tmp on every process, then swap it in on the main process.
    `keep_current`: these student weights become the kept ones; else the previous kept copy
    is carried over. A write that fails on any process (a full disk) stops every process with one
    line; folder.tmp is removed and the previous checkpoint stays as it was."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))  # every process writes its RNG state there...
    except WRITE_ERRORS as caught:
        error = caught
    accelerator.wait_for_everyone()  # ...and save_state has no barrier at its end: wait before the rename
    if accelerator.is_main_process and error is None:
        unwrapped = accelerator.unwrap_model(method)
        try:
            if keep_current:
                save_file(_student_tensors(unwrapped), tmp / KEPT)
            else:
                shutil.copy2(existing_dir(folder) / KEPT, tmp / KEPT)
            write_json_atomic(tmp / STATE, state.to_dict())
        except WRITE_ERRORS as caught:
            error = caught
    failed = accelerator.reduce(torch.tensor([error is not None], dtype=torch.int32, device=accelerator.device), reduction="sum")
    if int(failed.item()):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:  # the main process says it (a process other than the main one prints nothing)
            error = RuntimeError("another process could not write its part")
        raise write_failed("the checkpoint", folder.parent, error, checkpoint_bytes(accelerator, method, folder), last_good(folder)) from error
    if accelerator.is_main_process:
        replace_dir_atomic(tmp, folder)
    accelerator.wait_for_everyone()


def checkpoint_bytes(accelerator: Accelerator, method, folder: Path) -> int:
    """About what one checkpoint takes on disk: the last one's size, else the model twice (its
    weights and SGD's momentum) and the kept student."""
    source = existing_dir(folder)
    if source is not None:
        return sum(path.stat().st_size for path in source.iterdir() if path.is_file())
    unwrapped = accelerator.unwrap_model(method)
    size = lambda module: sum(v.numel() * v.element_size() for v in module.state_dict().values())  # noqa: E731
    return 2 * size(unwrapped) + size(unwrapped.student)


def last_good(folder: Path) -> str:
    """What a failed run leaves to continue from, and how, in words."""
    source = existing_dir(folder)
    try:
        epoch = json.loads((source / STATE).read_text())["epoch"] if source else None
    except (OSError, ValueError, KeyError, TypeError):
        epoch = None
    if epoch is None:
        return "no checkpoint was saved yet: start the run again"
    return f"the last good checkpoint (epoch {epoch}) is kept: --resume continues from it"


def load(accelerator: Accelerator, folder: Path) -> TrainerState:
    source = existing_dir(folder)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing it
            warnings.simplefilter("ignore")
            accelerator.load_state(str(source))
        # load_state restores accelerate's micro-step counter from the process's own RNG file:
        # counted with the saving run's --grad-accum, and absent for a process the saving run did
        # not have. A checkpoint sits at an epoch end, always a whole optimizer step: start at 0,
        # so that a run resumed on another process count or --grad-accum syncs where it should.
        accelerator.step = 0
        return TrainerState(**json.loads((source / STATE).read_text()))
    except pickle.UnpicklingError as error:
        raise UsageError(f"refused to resume from {source}: a file there holds Python objects that are not plain tensors "
                         "(an unsafe pickle, loaded only with weights_only=True); start a new run with --overwrite") from error
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot resume from {source}: the checkpoint is damaged or unsafe to load ({first_line[:200]}); start a new run with --overwrite") from error


def kept_student(folder: Path) -> dict:
    return load_file(existing_dir(folder) / KEPT)
