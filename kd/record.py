"""A leaderboard's record, a folder to keep in git so that the experiment outlives its machine:
each finished run's and each search's small files (metrics, resolved config, per-epoch
history; a search's study, preset and trials), never weights or checkpoints, and the sha256 of
the teacher's weights.

A driver on a new machine (`kd.leaderboard run --record DIR`) restores from it what it can
trust: at once the runs and the search that need no teacher (the student's, the plain loop's),
the rest once the teacher trained again here has the record's weights (on the same kind of CPU,
the same settings and seed train the same weights bit for bit). Local folders always win: a
record never overwrites a run or study that is here."""

import hashlib
import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

RUN_FILES = ("metrics.json", "run_config.json", "history.jsonl")  # all kd.report and the driver read of a run
SEARCH_FILES = ("tune.json", "best.yaml")  # beside study.db
TEACHER = Path("runs") / "teacher"
WEIGHTS_HASH = "model.safetensors.sha256"  # in the record's teacher folder, in place of the weights
STUDENT_SEARCH = Path("tune") / "student"  # the baseline's search: the one that needs no teacher


def weights_hash(out: Path) -> Optional[str]:
    """sha256 of the teacher's exported weights under `out` (None: no finished teacher)."""
    weights = out / TEACHER / "model.safetensors"
    if not (out / TEACHER / "metrics.json").is_file() or not weights.is_file():
        return None
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def recorded_hash(record: Path) -> Optional[str]:
    path = record / TEACHER / WEIGHTS_HASH
    return path.read_text().strip() if path.is_file() else None


def items(root: Path) -> Iterator[Tuple[Path, bool]]:
    """(folder relative to `root`, whether it needs the teacher) for each finished run, plain-loop
    run and search under a leaderboard folder or a record; the teacher itself is not one."""
    for metrics in sorted([*(root / "runs").glob("**/metrics.json"), *(root / "plain").glob("*/metrics.json")]):
        folder, config = metrics.parent.relative_to(root), metrics.parent / "run_config.json"
        if folder != TEACHER:  # a distillation run names its teacher; the plain loop has no run_config.json
            yield folder, config.is_file() and json.loads(config.read_text()).get("teacher") is not None
    for study in sorted((root / "tune").glob("*/study.db")):
        folder = study.parent.relative_to(root)
        yield folder, folder != STUDENT_SEARCH


def copy_item(source: Path, target: Path, folder: Path) -> None:
    """One run's or search's small files from `source`/folder to `target`/folder; a study is
    copied through SQLite's backup, a consistent snapshot even while its search writes to it."""
    origin, copy = source / folder, target / folder
    copy.mkdir(parents=True, exist_ok=True)
    if not (origin / "study.db").is_file():
        for name in RUN_FILES:
            if (origin / name).is_file():
                shutil.copyfile(origin / name, copy / name)
        return
    for name in SEARCH_FILES:
        if (origin / name).is_file():
            shutil.copyfile(origin / name, copy / name)
    snapshot = copy / "study.db.tmp"
    with closing(sqlite3.connect(origin / "study.db")) as study, closing(sqlite3.connect(snapshot)) as kept:
        study.backup(kept)
    snapshot.replace(copy / "study.db")
    for trial in sorted((origin / "trials").glob("*/history.jsonl")):  # finished or pruned trials: what the compute line counts
        copy_item(source, target, trial.parent.relative_to(source))


def save(out: Path, record: Path) -> Optional[str]:
    """Copy into `record` every finished item of `out` (replacing the record's copy: the local one
    is the newer), the teacher's small files and its weights' sha256. An item that needs the
    teacher is saved only while the record names this teacher: a record never mixes the runs of
    two teachers. Returns why some were not saved, or None."""
    here, kept = weights_hash(out), recorded_hash(record)
    if here is not None and kept is None:
        copy_item(out, record, TEACHER)
        (record / TEACHER / WEIGHTS_HASH).write_text(here + "\n")
        kept = here
    left = 0
    for folder, needs_teacher in items(out):
        if needs_teacher and (here is None or here != kept):
            left += 1
        else:
            copy_item(out, record, folder)
    if not left:
        return None
    return (f"{left} runs and searches of {out} not saved in {record}: it holds the runs of another teacher "
            f"(weights sha256 {(kept or 'none')[:12]}, here {(here or 'none')[:12]})")


def restore(record: Path, out: Path, only: Optional[Path] = None) -> Tuple[List[Path], int, Optional[str]]:
    """Copy from `record` into `out` each item `out` lacks (its metrics.json, or a search's
    study.db), or only the item `only` (a folder relative to both): the ones that need no teacher
    always, the others only when `out`'s teacher has the record's weights. Returns (the folders
    restored, how many that need the teacher were not, and why)."""
    here, kept = weights_hash(out), recorded_hash(record)
    if here is None:
        why = "there is no teacher here yet: restored once it has trained, if its weights are the record's"
    elif here != kept:
        why = f"the teacher here is not the record's (weights sha256 {here[:12]}, the record's {(kept or 'none')[:12]}): they train here again"
    else:
        why = None
    restored, held_back = [], 0
    for folder, needs_teacher in items(record):
        if (only is not None and folder != only) or (out / folder / ("study.db" if folder.parts[0] == "tune" else "metrics.json")).is_file():
            continue
        if needs_teacher and why:
            held_back += 1
            continue
        copy_item(record, out, folder)
        restored.append(folder)
    return restored, held_back, why


class Recording:
    """The leaderboard driver's side of a record: restored into its folder at the start, and each
    job's item again just before the job would start (so that a run that needs the teacher is
    restored once the teacher here has the record's weights); saved as each job finishes and at
    the end. Each note is said once."""

    def __init__(self, folder: Path, out: Path):
        self.record, self.out, self.said = folder, out, set()

    def note(self, line: Optional[str]) -> None:
        if line and line not in self.said:
            self.said.add(line)
            print(f"note: {line}", flush=True)

    def restore(self, only: Optional[Path] = None) -> None:
        restored, held_back, why = restore(self.record, self.out, only)
        if only is not None:
            for folder in restored:
                print(f"record: restored {folder} from {self.record}", flush=True)
            if held_back:
                self.note(f"the record's runs and searches that need the teacher are not restored: {why}")
            return
        if restored:
            print(f"record: restored {len(restored)} runs and searches from {self.record} into {self.out}", flush=True)
        if held_back:
            self.note(f"{held_back} runs and searches of {self.record} not restored: {why}")

    def before(self, job) -> None:
        self.restore(Path(job.out).relative_to(self.out))

    def save(self, job=None) -> None:
        self.note(save(self.out, self.record))
