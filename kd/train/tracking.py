"""Experiment tracking through accelerate's trackers (wandb, tensorboard)."""

import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Dict, List, Sequence, Tuple
from urllib.parse import urlsplit

TRACKERS = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"], "none": []}


def _wandb_has_credentials() -> bool:
    """Where wandb itself looks: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, then the netrc file
    ($NETRC or ~/.netrc) entry of the server in use (WANDB_BASE_URL: self-hosted servers too)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no file, unreadable or malformed: wandb would prompt
        return False


def resolve_trackers(report_to: str, announce) -> List[str]:
    """The trackers to start. wandb with no credentials and no WANDB_MODE falls back to
    offline mode with one notice: never a login prompt, never a crash."""
    trackers = TRACKERS[report_to]
    if "wandb" in trackers and not os.environ.get("WANDB_MODE") and not _wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        announce("wandb: no credentials found, logging offline (sync later with `wandb sync`; set WANDB_MODE=disabled or --report-to none to turn it off)")
    if "wandb" in trackers and os.environ.get("WANDB_MODE") == "disabled":
        trackers = [t for t in trackers if t != "wandb"]
    return trackers


LOGGING_DIR = "tensorboard"  # under the run folder: --overwrite clears it with the rest of the run


def project_config(run_dir: Path):
    """TensorBoard writes to <run>/tensorboard/<project> (accelerate's default is <run>/<project>,
    which the run's file list does not know)."""
    from accelerate.utils import ProjectConfiguration

    return ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / LOGGING_DIR))


def tracker_run_id(run_dir: Path, resume: bool) -> str:
    """The wandb run id, kept in run_config.json: --resume logs to the same run, not a new one."""
    if resume:
        saved = json.loads((Path(run_dir) / "run_config.json").read_text()).get("tracker_run_id")
        if saved:
            return saved
    return uuid.uuid4().hex[:12]


def init_kwargs(run_dir: Path, run_name: str, tags, run_id: str) -> Dict:
    return {"wandb": {"name": run_name, "tags": list(tags), "dir": str(run_dir), "id": run_id, "resume": "allow"}}


def flat_metrics(prefix: str, metrics: Dict) -> Dict[str, float]:
    """Scalars of a metrics dict (per_class flattened as prefix/class/stat)."""
    out = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for name, stats in metrics.get("per_class", {}).items():
        out.update({f"{prefix}/{name}/{k}": v for k, v in stats.items()})
    return out


def flat_config(resolved: Dict) -> Dict:
    """The resolved config as one level of scalars (what trackers accept)."""
    out = {}
    for section, values in resolved.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in values.items()})
        else:
            out[section] = values if isinstance(values, (int, float, str, bool)) or values is None else str(values)
    return out


def expand_confusion_matrix(matrix: Sequence[Sequence[int]]) -> Tuple[List[int], List[int]]:
    """(true labels, predictions) with each (true, predicted) pair repeated as often as the
    matrix counts it: the pairs a confusion matrix is made of, in class order."""
    pairs = [(true, predicted) for true, row in enumerate(matrix) for predicted, count in enumerate(row) for _ in range(int(count))]
    return [true for true, _ in pairs], [predicted for _, predicted in pairs]


def log_confusion_matrix(accelerator, key: str, matrix, class_names: Sequence[str], step: int) -> None:
    """wandb's own confusion-matrix chart, when wandb is one of the run's trackers (the other
    trackers take scalars only). Main process only: the trackers live there."""
    if not accelerator.is_main_process or "wandb" not in [tracker.name for tracker in accelerator.trackers]:
        return
    import wandb

    y_true, preds = expand_confusion_matrix(matrix)
    chart = wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=list(class_names), title=key)
    accelerator.get_tracker("wandb", unwrap=True).log({key: chart}, step=step)
