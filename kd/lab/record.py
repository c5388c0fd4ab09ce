"""A leaderboard's record, a folder to keep in git so that the experiment outlives its machine:
each finished run's and each search's small files (metrics, resolved config, per-epoch
history; a search's study, preset and trials), never weights or checkpoints, the sha256 of the
teacher's weights, and what every run was made with (driver.json: budget, data set, extra
flags, precision, machine, the budget's presets).

A driver on a new machine (`kd.leaderboard run --record DIR`) restores from it what it can
trust (its runs' curves and test confusion matrix drawn again from those files),
into folders that do not exist here: at once the runs and the search that need no
teacher (the student's, the plain loop's), the rest once the teacher trained again here has the
record's weights (on the same kind of machine, the same settings and seed train the same weights
bit for bit). A record made otherwise (another budget, data set, flags, precision, machine or
preset setting) is refused in one line; a teacher with other weights gets nothing from it and adds nothing to it."""

import functools
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

from kd.errors import UsageError
from kd.util.files import write_bytes_atomic, write_text_atomic

RUN_FILES = ("run_config.json", "history.jsonl", "metrics.json")  # metrics.json, which marks a run done, last
SEARCH_FILES = ("best.yaml", "study.db", "tune.json")  # after the trials; tune.json, which marks a search done, last
TEACHER = Path("runs") / "teacher"
WEIGHTS_HASH = "model.safetensors.sha256"  # in the record's teacher folder, in place of the weights
STUDENT_SEARCH = Path("tune") / "student"  # the baseline's search: the one that needs no teacher
MADE_WITH = "driver.json"
STAGING = ".restoring."  # + the restoring driver's pid: a folder of a driver killed mid-restore is swept by the next
ABSENT = object()  # a setting one side does not have, told apart from one whose value is None


def weights_hash(out: Path) -> Optional[str]:
    """sha256 of the teacher's exported weights under `out` (None: no finished teacher)."""
    weights = out / TEACHER / "model.safetensors"
    if not (out / TEACHER / "metrics.json").is_file() or not weights.is_file():
        return None
    stat = weights.stat()
    return _sha256(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # read again only when the file changed
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recorded_hash(record: Path) -> Optional[str]:
    path = record / TEACHER / WEIGHTS_HASH
    return path.read_text().strip() if path.is_file() else None


def is_item(root: Path, folder: Path) -> bool:
    """Whether `folder` (relative to `root`) is a finished run or plain-loop run, or a search."""
    if folder.parts[:1] == ("tune",):
        return (root / folder / "study.db").is_file()
    return folder != TEACHER and (root / folder / "metrics.json").is_file()


def needs_teacher(root: Path, folder: Path) -> bool:
    """A distillation run names its teacher in run_config.json (the plain loop writes none); every
    search but the student's trains from the teacher."""
    if folder.parts[:1] == ("tune",):
        return folder != STUDENT_SEARCH
    config = root / folder / "run_config.json"
    return config.is_file() and json.loads(config.read_text()).get("teacher") is not None


def items(root: Path) -> Iterator[Path]:
    """Every finished run, plain-loop run and search under a leaderboard folder or a record
    (relative to it); the teacher itself is not one."""
    candidates = [*(root / "runs").glob("**/metrics.json"), *(root / "plain").glob("*/metrics.json"), *(root / "tune").glob("*/study.db")]
    for path in sorted(candidates):
        folder = path.parent.relative_to(root)
        if is_item(root, folder):
            yield folder


def _copy_study(source: Path, target: Path) -> None:
    """SQLite's backup: a consistent snapshot even while its search writes to it."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # its own per process: two drivers may save at once
    with closing(sqlite3.connect(source)) as study, closing(sqlite3.connect(temporary)) as kept:
        study.backup(kept)
    os.replace(temporary, target)


def _trials_over(study: Path) -> Set[int]:
    """The numbers of a search's trials that are over (complete, pruned, or failed where a search
    was killed): a running trial's folder is still growing, and a resumed search trains it again."""
    with closing(sqlite3.connect(f"file:{study}?mode=ro", uri=True)) as db:
        return {number for number, state in db.execute("select number, state from trials") if state != "RUNNING"}


def _read_run(origin: Path) -> Optional[Dict[str, bytes]]:
    """A run's small files as they are at one moment, or None where the run changed while they
    were read (a tuned run started over by another driver on this folder): the file that marks
    it done (absent for a pruned trial) is read before and after the others, and must not change."""
    marker = origin / RUN_FILES[-1]
    try:
        before = marker.read_bytes() if marker.is_file() else None
        files = {name: (origin / name).read_bytes() for name in RUN_FILES[:-1] if (origin / name).is_file()}
        after = marker.read_bytes() if marker.is_file() else None
    except FileNotFoundError:  # deleted between the look and the read
        return None
    if before != after:
        return None
    return {**files, **({marker.name: after} if after is not None else {})}


def copy_item(origin: Path, copy: Path) -> None:
    """One run's or search's small files from folder `origin` to folder `copy`, the file that
    marks it done last, so that a copy cut short is never taken for a finished one; a run that
    changes while it is read is left as it was in `copy` (the next save takes it)."""
    if (origin / "study.db").is_file():
        copy.mkdir(parents=True, exist_ok=True)
        over = _trials_over(origin / "study.db")
        for trial in sorted((origin / "trials").glob("*/history.jsonl")):  # the trials over: what the compute line counts
            if int(trial.parent.name) in over:
                copy_item(trial.parent, copy / "trials" / trial.parent.name)
        for name in SEARCH_FILES:
            if name == "study.db":
                _copy_study(origin / name, copy / name)
            elif (origin / name).is_file():
                write_bytes_atomic(copy / name, (origin / name).read_bytes())
        return
    files = _read_run(origin)
    if files is None:
        return
    copy.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():  # in RUN_FILES' order: the marker last
        write_bytes_atomic(copy / name, data)


def draw_figures(run: Path) -> None:
    """A restored run's curves and test confusion matrix, drawn again from its small files (the
    record keeps no PNG), as the run drew them, so that its folder looks like one trained here."""
    from kd.train.plots import curves, plot_confusion_matrix, plot_history
    from kd.lab.ranking import history

    metrics, epochs = json.loads((run / RUN_FILES[-1]).read_text()), history(run)
    if curves(epochs):  # nothing to plot in a history without losses or metrics
        plot_history(epochs, run / "curves.png")
    test = metrics.get("test") or {}
    if "confusion_matrix" in test and "per_class" in test:  # per_class is keyed by class name, in label order
        plot_confusion_matrix(test["confusion_matrix"], list(test["per_class"]), run / "confusion_matrix.png")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def flat(settings: Dict, prefix: str = "") -> Dict:
    """Nested settings (a preset's) as one level of dotted keys."""
    out = {}
    for key, value in settings.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def first_difference(kept: Dict, now: Dict) -> Optional[tuple]:
    """(dotted key, the record's value, this driver's) of the first setting the two differ in,
    looking into nested settings (a preset's); ABSENT for a setting one of them lacks (a whole
    section an older kd did not write is named as one), so that a None value is not taken for
    a missing one. None when they agree."""
    for key in dict.fromkeys([*now, *kept]):
        if key not in kept or key not in now:
            return key, kept.get(key, ABSENT), now.get(key, ABSENT)
        if isinstance(kept[key], dict) and isinstance(now[key], dict):
            inner = first_difference(flat(kept[key]), flat(now[key]))
            if inner:
                return f"{key}.{inner[0]}", inner[1], inner[2]
        elif kept[key] != now[key]:
            return key, kept[key], now[key]
    return None


class Recording:
    """The leaderboard driver's side of a record: checked against what this driver makes
    (`made_with`), restored into DIR at the start and each job's item again just before the job
    would start (so that a run that needs the teacher is restored once the teacher here has the
    record's weights); saved as each job finishes and at the end. Each note is said once."""

    def __init__(self, folder: Path, out: Path, made_with: Dict):
        self.record, self.out, self.said = folder, out, set()
        recorded = folder / MADE_WITH
        kept = json.loads(recorded.read_text()) if recorded.is_file() else made_with
        differs = first_difference(kept, made_with)
        if differs:
            key, was, now = differs
            made = (f"has no {key}" if was is ABSENT else f"was made with {key} {was!r}, which this driver does not set" if now is ABSENT
                    else f"was made with {key} {was!r}, this driver's is {now!r}")
            raise UsageError(f"the record {folder} {made}: give it another --record folder")
        self.made_with = made_with

    def note(self, line: Optional[str]) -> None:
        if line and line not in self.said:
            self.said.add(line)
            print(f"note: {line}", flush=True)

    def teacher_differs(self) -> Optional[str]:
        """Why the runs that need the teacher are not to be trusted here (None: they are)."""
        here, kept = weights_hash(self.out), recorded_hash(self.record)
        if here is None:
            return "there is no teacher here yet: they are restored once it has trained, if its weights are the record's"
        if kept is not None and here != kept:
            return (f"the teacher here is not the record's (weights sha256 {here[:12]}, the record's {kept[:12]}): its runs train "
                    "here again, and nothing of this folder is saved in the record")
        return None

    def restore(self, only: Optional[Path] = None) -> List[Path]:
        """Copy from the record each item (or only `only`) whose folder does not exist here: a
        folder here, finished or not, always wins. Returns the folders restored."""
        self._sweep()
        why, restored, held_back = self.teacher_differs(), [], 0
        candidates = list(items(self.record)) if only is None else [only] if is_item(self.record, only) else []
        for folder in candidates:
            if (self.out / folder).exists():
                continue
            if why and needs_teacher(self.record, folder):
                held_back += 1
                continue
            if self._restore(folder):
                restored.append(folder)
        if restored:
            what = f"{len(restored)} runs and searches" if only is None else str(only)
            print(f"record: restored {what} from {self.record}" + (f" into {self.out}" if only is None else ""), flush=True)
        if held_back:
            self.note(f"the runs and searches of {self.record} that need the teacher are not restored: {why}")
        return restored

    def _sweep(self) -> None:
        """Remove the staging folders of drivers that died mid-restore (killed: their finally never
        ran); those of a driver still running, which may be restoring into this folder now, stay."""
        for staging in self.out.glob(STAGING + "*"):
            pid = staging.name[len(STAGING):].split(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(staging, ignore_errors=True)

    def _restore(self, folder: Path) -> bool:
        """Copy one item into a hidden folder beside the runs, then rename it into place: a
        restore cut short leaves no folder of the item here (which would win over the record
        and train again), and the next driver restores it whole. False where another driver
        put the folder here first."""
        self.out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.out, prefix=f"{STAGING}{os.getpid()}."))
        try:
            copy_item(self.record / folder, staging / folder)
            for run in (staging / folder).rglob(RUN_FILES[-1]):
                draw_figures(run.parent)
            (self.out / folder).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging / folder, self.out / folder)
            except OSError:  # a folder there now, not empty
                return False
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def before(self, job) -> None:
        self.restore(Path(job.out).relative_to(self.out))

    def save(self) -> None:
        """Copy into the record every item here (also those another driver on this folder
        finished), with the teacher's small files and weights' sha256 when the record has none, and
        driver.json. The runs that need no teacher are saved while the teacher here trains, so that
        a session that ends before its teacher keeps them; nothing at all once the teacher here is
        found not to be the record's, so that a record never mixes two teachers' runs (the baseline
        runs saved before that stay: the same kind of machine, settings and seeds made them). A few
        kB a run: cheap beside any job."""
        here, kept = weights_hash(self.out), recorded_hash(self.record)
        if here is not None and kept is not None and here != kept:
            self.note(self.teacher_differs())
            return
        self.record.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.record / MADE_WITH, json.dumps(self.made_with, indent=2) + "\n")
        if here is not None and kept is None:
            copy_item(self.out / TEACHER, self.record / TEACHER)
            write_text_atomic(self.record / TEACHER / WEIGHTS_HASH, here + "\n")
        for folder in items(self.out):
            if here is not None or not needs_teacher(self.out, folder):
                copy_item(self.out / folder, self.record / folder)
