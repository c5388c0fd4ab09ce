"""The leaderboard's jobs (a training or a search, with the jobs it needs first) and the
scheduler that runs them a few at a time, each in its own process, skipping what is done.
Each process holds a lock on its folder's FOLDER.lock for as long as it lives, so that a second
driver on the same DIR (or one started again while a killed driver's runs go on) waits for
that run instead of training it twice into the same folder."""

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock
    fcntl = None


@dataclass
class Job:
    name: str
    out: Path
    command: List[str]  # a training's command ends before --resume/--overwrite, which argv() adds
    needs: List[str] = field(default_factory=list)
    trials: Optional[int] = None  # a search: done when this many trials finished...
    grid: Optional[Dict[str, list]] = None  # ...on this grid (None: TPE draws)
    search: Optional[Path] = None  # a tuned run: done only if trained with its search's best point
    after: List[str] = field(default_factory=list)  # jobs to wait for, whether they finish or fail
    gate: Optional[Callable[[], Optional[str]]] = None  # asked once needs and after settled: why it is left out (None: it runs)

    def done(self) -> bool:
        if self.trials is None:
            return (self.out / "metrics.json").is_file() and not self.outdated()
        summary = self.out / "tune.json"
        if not summary.is_file():
            return False
        searched = json.loads(summary.read_text())
        return searched["trials"] >= self.trials and searched.get("grid") == self.grid

    def outdated(self) -> bool:
        """A tuned run, finished or interrupted, whose settings are no longer its search's best
        point (the search went on after it, e.g. with more --trials): trained again from scratch."""
        if self.search is None or not (self.search / "tune.json").is_file():
            return False
        resolved = self.out / "run_config.json"
        if not resolved.is_file():  # nothing to compare: a finished run is redone, a fresh one started
            return (self.out / "metrics.json").is_file()
        config = json.loads(resolved.read_text())
        settings = {**config["train"], **(config.get("distill") or {})}
        best = json.loads((self.search / "tune.json").read_text())["best_params"]
        return any(settings.get(name) != value for name, value in best.items())

    def argv(self) -> List[str]:
        if self.trials is not None:
            return self.command
        # an interrupted run continues from its checkpoint; anything else is started over
        resume = (self.out / "checkpoint").exists() and not self.outdated()
        return [*self.command, "--resume" if resume else "--overwrite"]

    def lock_path(self) -> Path:
        return Path(f"{self.out}.lock")

    def busy(self) -> bool:
        """Another process (a run started by another driver) holds this job's lock."""
        if fcntl is None or not self.lock_path().exists():  # its holder would have made it
            return False
        try:
            with open(self.lock_path()) as lock:  # read only: a dry run on a read-only DIR works
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # unreadable: nobody can tell, so it is not counted busy
            return False
        return False

    def status(self) -> str:
        if self.done():
            return "skip"
        if self.busy():
            return "busy"
        if self.outdated():
            return "redo"
        return "resume" if (self.out / "checkpoint").exists() or (self.out / "study.db").exists() else "run"


def take_lock(job: Job):
    """The job's lock file, open and locked (flock, exclusive); None where another process holds
    it (or on a system without flock)."""
    if fcntl is None:
        return None
    lock = open(job.lock_path(), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def gpu_of(slot: int) -> str:
    """The one GPU slot i trains on (--parallel N on N GPUs): the i-th of those CUDA_VISIBLE_DEVICES
    names where it is set (a cluster's scheduler sets it, e.g. "4,5"), else GPU i; none ("") for a
    slot past the last named (the driver refuses such a --parallel where there is CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(slot)
    names = [name.strip() for name in visible.split(",") if name.strip()]
    return names[slot] if slot < len(names) else ""


def start(job: Job, slot: int, threads: Optional[int], gpu_per_run: bool) -> Optional[subprocess.Popen]:
    """The job's process, which inherits the lock and holds it until it exits, even if this
    driver is killed; None when another process holds it or finished it in the meantime."""
    job.out.parent.mkdir(parents=True, exist_ok=True)
    lock = take_lock(job)
    if lock is None and fcntl is not None:
        return None
    if lock is not None and job.done():  # another process finished it between our look and the lock
        lock.close()
        return None
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if gpu_per_run:
        env["CUDA_VISIBLE_DEVICES"] = gpu_of(slot)
    # the child's inherited copy of the lock keeps it locked after ours is closed
    with open(f"{job.out}.log", "a") as log, lock or contextlib.nullcontext():
        return subprocess.Popen(job.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(lock.fileno(),) if lock else ())


def execute(jobs: Sequence[Job], parallel: int, threads: Optional[int] = None, gpu_per_run: bool = False,
            on_done: Optional[Callable[[Job], None]] = None, before: Optional[Callable[[Job], None]] = None) -> Tuple[List[str], int]:
    """Run the jobs not done yet, `parallel` at a time (each with `threads` torch threads; with
    `gpu_per_run`, slot i on the i-th visible GPU), each once its needs are done; a failure skips what needs it
    and the rest goes on. A done job whose needs are still to run waits too: a search that goes
    on may outdate it. A job with a gate is judged once its needs and `after` have settled; one
    it leaves out is said so and not run. A job another process holds waits for it (said once)
    and is skipped if that process finished it. `on_done(job)` is called as each job finishes,
    before any other starts; `before(job)` as a job's turn comes, unless another process holds
    it, before it is looked at (it may finish the job, e.g. from a record). Returns (the names
    that failed or were skipped, the number of jobs that ran and finished)."""
    pending = {job.name for job in jobs if not job.done()}
    waiting = [job for job in jobs if job.name in pending or pending & set(job.needs)]
    running: Dict[int, tuple] = {}  # slot -> (job, process, start time)
    failed: List[str] = []
    busy = set()  # the jobs found held by another process, said once each
    finished = 0
    while waiting or running:
        for slot, (job, process, began) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            ok = process.returncode == 0 and job.done()
            print(f"{'done' if ok else 'FAILED'} {job.name}: {time.monotonic() - began:.0f} s" + ("" if ok else f" (see {job.out}.log)"), flush=True)
            if not ok:
                failed.append(job.name)
            elif on_done is not None:
                on_done(job)
            finished += ok
        blocked = [job for job in waiting if any(need in failed for need in job.needs)]
        for job in blocked:
            waiting.remove(job)
            if job.done():  # a failed search left it as it was: still made with the best point
                continue
            print(f"skipped {job.name}: it needs {', '.join(need for need in job.needs if need in failed)}", flush=True)
            failed.append(job.name)
        unsettled = {job.name for job, _, _ in running.values()} | {job.name for job in waiting}
        ready = [job for job in waiting if unsettled.isdisjoint(job.needs) and unsettled.isdisjoint(job.after)]
        free = [slot for slot in range(parallel) if slot not in running]
        while free and ready:
            job = ready.pop(0)
            held = job.busy()
            if before is not None and not held:  # never into a folder another process writes
                before(job)
            if job.done():  # still made with its search's best point, or finished by another driver
                waiting.remove(job)
                continue
            reason = job.gate() if job.gate and not held else None
            if reason:
                waiting.remove(job)
                print(f"left out {job.name}: {reason}", flush=True)
                continue
            process = None if held else start(job, free[0], threads, gpu_per_run)  # None: taken in the meantime
            if process is None:  # another driver's run: it stays waiting, to be looked at again
                if job.done():
                    waiting.remove(job)
                    continue
                if job.name not in busy:
                    print(f"busy {job.name}: another process trains it (it holds {job.lock_path()}); waiting for it", flush=True)
                    busy.add(job.name)
                continue
            waiting.remove(job)
            running[free.pop(0)] = (job, process, time.monotonic())
        time.sleep(0.5)
    return failed, finished
