"""The run folder's files, written atomically (a temporary file, then a rename), and models
loaded back from them safely: weights only from safetensors, never from a pickle."""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Sequence

import timm
import torch

from kd.errors import UsageError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def export_model(model: torch.nn.Module, run_dir: Path, class_names: Sequence[str], mean, std, input_size: Sequence[int]) -> None:
    """timm's save_for_hf format (config.json + model.safetensors) with label names, the
    normalisation and the input size (C, H, W) the weights were trained with, so that
    timm.create_model("local-dir:RUN_DIR", pretrained=True) rebuilds it after `import kd`."""
    from timm.models import save_for_hf

    run_dir = Path(run_dir)
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".export."))
    try:
        save_for_hf(
            model,
            staging,
            model_config={"label_names": list(class_names)},
            safe_serialization=True,
            data_config={"mean": tuple(mean), "std": tuple(std), "input_size": tuple(input_size)},
        )
        # weights first, config last: a config.json always has complete weights beside it
        for name in (WEIGHTS, CONFIG):
            os.chmod(staging / name, 0o644)  # safetensors writes 0600; a shared teacher must be readable
            os.replace(staging / name, run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_model_config(folder: Path) -> Dict:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} is missing or not valid JSON ({error.__class__.__name__}); is {folder} a run folder of train_teacher.py?") from error
    if "architecture" not in config:
        raise UsageError(f"{path} names no architecture; is {folder} a model exported by kd?")
    return config


def load_model(source: str, what: str = "model") -> torch.nn.Module:
    """A model from a run/export folder (config.json + model.safetensors) or `hf-hub:ORG/NAME`."""
    if source.startswith("hf-hub:"):
        try:
            return timm.create_model(source, pretrained=True)
        except Exception as error:  # network errors come in many types
            raise UsageError(f"could not load {what} {source} from the Hugging Face Hub ({error.__class__.__name__}); pass a local folder") from error
    folder = Path(source)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise UsageError(
            f"no {what} at {source} (it needs {CONFIG} and {WEIGHTS}); train one first "
            "(accelerate launch train_teacher.py) or pass --teacher with a run folder"
        )
    config = read_model_config(folder)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"{folder / WEIGHTS} is not a readable safetensors file ({error}); export the {what} again") from error
    if config["architecture"] not in timm.list_models():
        raise UsageError(f"{what} at {source} is a {config['architecture']!r}, which is not a registered model")
    model_args = {**config.get("model_args", {}), "num_classes": config["num_classes"]}
    model = timm.create_model(config["architecture"], **model_args)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UsageError(f"{folder / WEIGHTS} does not fit a {config['architecture']}: {first[1].strip() if len(first) > 1 else first[0]}") from error
    pretrained_cfg = dict(config.get("pretrained_cfg", {}))
    model.pretrained_cfg = {**model.pretrained_cfg, **pretrained_cfg, "label_names": config.get("label_names")}
    return model
