"""The study of a kd.tune search: where it is stored, and how several workers share it.

One search folder, one study. By default it lives in OUTPUT_DIR/study.db (SQLite: one writer
at a time, the leaderboard's records copy it). `--storage journal` keeps it in
OUTPUT_DIR/study.journal (Optuna's JournalStorage on a file, with its lock file), which any
number of workers on one machine or on a shared file system may write at once; an RDB URL
(postgresql://..., mysql://...) serves workers on many machines.

Workers take turns (a lock file, OUTPUT_DIR/study.lock) to set the study up and to draw each
trial, so that two never queue a grid twice, draw from the same sampler state or both take the
last trial of the budget. Each worker holds its own lock file in OUTPUT_DIR/workers/ while it
lives: a running trial whose worker's file is free was cut off by a kill, and is marked failed
(its point tried again) by the next worker that looks."""

import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Dict, List, Optional

from kd.errors import UsageError
from kd.lab.space import enqueue_grid

try:
    import fcntl
except ImportError:  # no flock (Windows): one worker per search
    fcntl = None

PRUNE_STARTUP_TRIALS = 3  # trials that always finish before the median means anything
STUDY_FILES = {"sqlite": "study.db", "journal": "study.journal"}


def storage_of(out: Path, choice: str):
    """The Optuna storage of the search folder `out`: `choice` is sqlite, journal or an RDB URL. A
    folder whose study is kept in the other file is refused (a second, empty study would start)."""
    kept = [name for kind, name in STUDY_FILES.items() if kind != choice and (out / name).is_file()]
    if kept:
        kind = next(kind for kind, name in STUDY_FILES.items() if name == kept[0])
        raise UsageError(f"{out} keeps its study in {kept[0]}: resume with --storage {kind}, or use another --output-dir")
    if choice == "sqlite":
        return f"sqlite:///{(out / STUDY_FILES['sqlite']).resolve()}"
    if choice == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str((out / STUDY_FILES["journal"]).resolve())
        # the open lock (a file created with O_EXCL) works on NFS too, where symlinks may not be atomic
        return JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path)))
    return check_storage(choice)


def check_storage(choice: str) -> str:
    if choice not in STUDY_FILES and "://" not in choice:
        raise UsageError(f"--storage {choice!r}: want sqlite, journal or a database URL (postgresql://user@host/db)")
    return choice


class TakeTurns:
    """OUTPUT_DIR/study.lock, held (flock, exclusive) while one worker sets the study up or draws."""

    def __init__(self, out: Path):
        self.path = out / "study.lock"

    def __enter__(self):
        self.file = open(self.path, "a")
        if fcntl is not None:
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()  # closing releases the lock


class Worker:
    """This process's lock file in OUTPUT_DIR/workers/, held while it lives; its name goes into the
    trials it runs. A random part: a later process with the same id is another worker."""

    def __init__(self, out: Path):
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder = out / "workers"
        folder.mkdir(exist_ok=True)
        self.path = folder / f"{self.name}.lock"
        self.file = open(self.path, "w")
        if fcntl is not None:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.file.close()


def alive(out: Path, worker: Optional[str]) -> bool:
    """Whether the worker named `worker` still runs (holds its lock file); a trial that names none
    is from a single search, which was killed if its trial still reads running."""
    path = out / "workers" / f"{worker}.lock"
    if not worker or fcntl is None or not path.is_file():
        return False
    with open(path, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        path.unlink(missing_ok=True)  # a killed worker's file: held by us now, nobody else will need it
    return False


def others_alive(out: Path, me: str) -> bool:
    return any(alive(out, path.stem) for path in (out / "workers").glob("*.lock") if path.stem != me)


def open_study(out: Path, method: str, sampler_seed: int, prune_from_epoch: int, training_args: List[str], grid: Optional[Dict] = None,
               storage: str = "sqlite"):
    """The study of `out`, created or loaded (call it with the turn held); trials a killed search
    left running are marked failed."""
    import optuna

    store = storage_of(out, storage)
    others = [name for name in optuna.get_all_study_names(store) if name != method]
    if others:
        raise UsageError(f"{out} holds a search for {others[0]!r}; use another --output-dir for {method!r}")
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=prune_from_epoch)
    study = optuna.create_study(study_name=method, storage=store, direction="maximize", pruner=pruner, load_if_exists=True)
    if grid is not None and "grid" not in study.user_attrs and finished(study):  # queued points would mix with its draws
        raise UsageError(f"{out} holds a search of TPE draws; a --grid search needs another --output-dir")
    if grid is None and "grid" in study.user_attrs:  # its queued points would run before any draw, and tune.json would say grid
        raise UsageError(f"{out} holds a --grid search; resume it with its --grid, or give a search of TPE draws another --output-dir")
    saved = study.user_attrs.get("training_args")
    if saved is not None and saved != training_args:
        raise UsageError(f"{out} was searched with training flags {' '.join(saved)}; resume with the same flags or use another --output-dir")
    study.set_user_attr("training_args", training_args)
    if grid is not None:
        if study.user_attrs.get("grid", grid) != grid:
            raise UsageError(f"{out} was searched on the grid {study.user_attrs['grid']}; resume with the same --grid or use another --output-dir")
        study.set_user_attr("grid", grid)
    fail_cut_off(study, out, grid)
    return study


def fail_cut_off(study, out: Path, grid: Optional[Dict]) -> None:
    """Mark failed each running trial whose worker is gone; its point is tried again (a TPE draw
    queued here, a grid's by enqueue_grid)."""
    import optuna

    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if alive(out, stale.user_attrs.get("worker")):
            continue
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        if grid is None and stale.params:  # a TPE draw is tried again, not dropped for a new one
            study.enqueue_trial(stale.params)
        again = "its point is tried again" if grid is not None or stale.params else "it had drawn no point yet"  # killed before suggest
        print(f"trial {stale.number} was interrupted; marked failed (it does not count toward --trials), {again}",
              file=sys.stderr, flush=True)


def finished(study) -> List:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def running(study) -> List:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def next_trial(study, out: Path, worker: Worker, sampler_seed: int, budget: int, grid: Optional[Dict]):
    """A new trial of the study, or None once the finished and running trials fill the budget
    (call it with the turn held). The sampler is reseeded by the history's length: each draw is
    reproducible, and two workers never draw from the same state."""
    import optuna

    fail_cut_off(study, out, grid)  # a worker killed meanwhile: its trial is run again
    if len(finished(study)) + len(running(study)) >= budget:
        return None
    if grid is not None:
        enqueue_grid(study, grid)  # the points no trial holds, a cut-off one among them
    # constant_liar: other workers' running trials count as drawn, so that the next draw goes elsewhere
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials), n_startup_trials=PRUNE_STARTUP_TRIALS,
                                               constant_liar=True)
    trial = study.ask()
    trial.set_user_attr("worker", worker.name)
    return trial
