"""A training run from start to finish: the run folder, the accelerator, the data, the epochs
with checkpoints, the kept weights, the final metrics. Every script goes through `run`."""

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from kd.train import checkpoint, device, engine, rundir, tracking
from kd.config import DistillConfig, RunArgs, TrainConfig, with_defaults
from kd.data import CifarData, DeviceLoader, Layout, default_crop_padding, load_cifar
from kd.distillers import Distiller
from kd.errors import UsageError
from kd.train.export import export_model
from kd.util.files import existing_dir, write_json_atomic, write_text_atomic
from kd.hub import CARD, push_run, write_model_card
from kd.train.metrics import absent_classes_warning
from kd.train.plots import plot_confusion_matrix, plot_history

CHECKPOINT = "checkpoint"
RUN_FILES = ("config.json", "model.safetensors", "metrics.json", "run_config.json", "history.jsonl",
             "curves.png", "confusion_matrix.png", "README.md", CHECKPOINT, CHECKPOINT + ".old", "wandb", "tensorboard")

# builds the method to train from (student, data, accelerator); returns it and facts for run_config.json
MethodFactory = Callable[[torch.nn.Module, CifarData, Accelerator], Distiller]
# called with each epoch's record (as in history.jsonl) once its checkpoint is saved; an
# exception it raises (kd.tune's "pruned") stops the run there, resumable, with no metrics.json;
# every process calls it, so under several processes it must decide alike on all of them
EpochCallback = Callable[[Dict], None]


def check_output_dir(run: RunArgs) -> None:
    out = Path(run.output_dir)
    # a run_config.json alone is an attempt that saved nothing (stopped before its first checkpoint): started again
    has_run = out.exists() and any((out / name).exists() for name in ("metrics.json", CHECKPOINT, CHECKPOINT + ".old"))
    if run.resume and not (existing_dir(out / CHECKPOINT)):
        raise UsageError(f"nothing to resume in {out}: it holds no checkpoint; drop --resume to start a new run")
    if has_run and not run.resume and not run.overwrite:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, or another --output-dir")


def clear_old_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


SMALL_FILES = 2**20  # about what the JSON files, figures and card of a run take, and then some


def writing(what: str, out: Path, needed_bytes: int = SMALL_FILES):
    """A failed write of `what` in the run folder `out` ends in one line (kd.train.rundir.write_failed)."""
    return rundir.writing(what, out, needed_bytes, kept=lambda: checkpoint.last_good(out / CHECKPOINT))


def write_history(accelerator: Accelerator, out: Path, state) -> None:
    """history.jsonl: the checkpoint's epochs, one JSON record a line."""
    if accelerator.is_main_process:
        with writing("history.jsonl", out):
            write_text_atomic(out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))


def provenance() -> Dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import accelerate
    import datasets
    import timm as timm_module

    versions = {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__,
                "datasets": datasets.__version__, "timm": timm_module.__version__}
    return {"git_commit": commit or None, "versions": versions, "command": " ".join(sys.argv)}


def make_accelerator(cfg: TrainConfig, run: RunArgs, trackers, precision: device.Precision) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=precision.mode,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=trackers or None,
        project_config=tracking.project_config(Path(run.output_dir)),
        # no broadcast of BatchNorm's buffers from rank 0 before every forward: they only change
        # what evaluation and the checkpoint see, and engine.evaluate syncs them before both
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UsageError(f"{launched} processes were launched but accelerate runs {accelerator.num_processes}; on CPU set ACCELERATE_USE_CPU=1")
    device.tune_for(accelerator.device)
    per_step = accelerator.num_processes * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by {accelerator.num_processes} processes x {cfg.grad_accum} accumulation steps")
    return accelerator


def check_model_name(name: str) -> None:
    if name not in timm.list_models():
        raise UsageError(f"unknown model {name!r}; kd models: {', '.join(timm.list_models('cifar_*'))}")


def create_student(cfg: TrainConfig, num_classes: int, image_shape: Optional[Sequence[int]] = None) -> torch.nn.Module:
    """The student from the timm registry; `image_shape` (C, H, W) is recorded as its input size,
    so that its taps are measured at the size it trains on."""
    check_model_name(cfg.model)
    model = timm.create_model(cfg.model, num_classes=num_classes)
    if image_shape is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": tuple(image_shape)}
    return model


def loaders(data: CifarData, cfg: TrainConfig, run: RunArgs, accelerator: Accelerator):
    common = dict(device=accelerator.device, mean=data.mean, std=data.std, process_index=accelerator.process_index,
                  num_processes=accelerator.num_processes, channels_last=run.channels_last)
    train = DeviceLoader(data.train, cfg.batch_size // cfg.grad_accum, train=True, seed=cfg.seed, crop_padding=crop_padding(cfg, data), **common)
    if len(train) < cfg.grad_accum:
        raise UsageError(f"{len(data.train)} training images make no full batch of {cfg.batch_size}; lower --batch-size")
    evaluation = lambda split: DeviceLoader(split, cfg.batch_size, train=False, **common) if split is not None else None  # noqa: E731
    return train, evaluation(data.val), evaluation(data.test)


def load_data(accelerator: Accelerator, cfg: TrainConfig, run: RunArgs) -> CifarData:
    """The main process decodes and caches the dataset first; the others then read the cache.
    A dataset the main process cannot load stops every process with its one error line (the
    others would otherwise crash with a traceback in the barrier they wait at)."""
    layout = Layout(run.image_column, run.label_column, run.test_split, cfg.image_size)
    copies = accelerator.num_processes if accelerator.device.type != "cuda" else 1  # CPU processes each hold the set in the host memory
    load = lambda: load_cifar(run.dataset, cfg.val_size, cfg.max_train_samples, cfg.max_eval_samples, layout,  # noqa: E731
                              accelerator.device, copies)
    data, error = None, None
    if accelerator.is_main_process:
        try:
            data = load()
        except UsageError as caught:
            error = caught
    failed = accelerator.reduce(torch.tensor([error is not None], dtype=torch.int32, device=accelerator.device), reduction="sum")
    if error is not None:
        raise error
    if int(failed.item()):
        raise UsageError("the main process could not load the dataset")  # printed by the main process only
    if data is not None:  # the main process: what decoding changed (an alpha channel dropped), said once
        for note in data.notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    return data if data is not None else load()


def crop_padding(cfg: TrainConfig, data: CifarData) -> int:
    return default_crop_padding(data.image_shape) if cfg.crop_padding is None else cfg.crop_padding


def run(cfg: TrainConfig, run: RunArgs, make_method: MethodFactory, distill: Optional[DistillConfig] = None, extra: Optional[Dict] = None,
        on_epoch: Optional[EpochCallback] = None) -> Dict:
    """Train `cfg.model` with the method `make_method` builds; returns the final metrics. The run
    folder is claimed first, before anything is loaded: one live run owns it (kd.train.rundir)."""
    check_output_dir(run)  # refused before anything is touched
    check_model_name(cfg.model)
    if run.push_to_hub and not run.test_eval:
        raise UsageError("--push-to-hub publishes the test metrics in the model card: drop --no-test-eval")
    with rundir.owned(Path(run.output_dir), main=os.environ.get("RANK", "0") == "0"):  # rank 0 holds it for the run's processes
        return owned_run(cfg, run, make_method, distill, extra, on_epoch)


def owned_run(cfg: TrainConfig, run: RunArgs, make_method: MethodFactory, distill: Optional[DistillConfig], extra: Optional[Dict],
              on_epoch: Optional[EpochCallback]) -> Dict:
    """`run`'s work once its folder is claimed."""
    check_output_dir(run)  # again, holding the lock: a run that finished here since the first look is not overwritten
    out = Path(run.output_dir)
    announce = lambda m: print(m, file=sys.stderr, flush=True) if os.environ.get("RANK", "0") == "0" else None  # noqa: E731  before accelerate starts
    trackers = tracking.resolve_trackers(run.report_to, announce=announce)
    precision = device.choose_precision(run.mixed_precision, warn=announce)
    # whoever started the process group ends it: kd.tune's search over several processes starts
    # it before its first trial and keeps it for the next (end_training would destroy it while
    # accelerate's state stays initialised, and the next trial's first collective would fail)
    caller_owns_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    accelerator = make_accelerator(cfg, run, trackers, precision)
    set_seed(cfg.seed)
    data = load_data(accelerator, cfg, run)
    method = make_method(create_student(cfg, data.num_classes, data.image_shape), data, accelerator)
    resolved = resolved_config(cfg, distill, run, extra or {}, data, accelerator, precision)
    if run.resume:
        check_resumable(out, resolved)
    resolved["tracker_run_id"] = tracking.tracker_run_id(out, run.resume)
    accelerator.wait_for_everyone()  # every process has checked the folder before anything is written
    if accelerator.is_main_process:
        rundir.clear_stale(out, RUN_FILES, [CHECKPOINT + ".tmp"])  # a killed run's: this run owns the folder
        if not run.resume and (run.overwrite or (out / "run_config.json").exists()):  # the latter: an attempt that saved nothing
            clear_old_run(out)
        with writing("run_config.json", out):
            write_json_atomic(out / "run_config.json", resolved)
    accelerator.init_trackers(run.project, config=tracking.flat_config(resolved),
                              init_kwargs=tracking.init_kwargs(out, run.run_name or out.name, run.tags, resolved["tracker_run_id"]))
    try:
        metrics = fit(accelerator, method, data, cfg, run, precision, on_epoch)
        accelerator.wait_for_everyone()
    finally:  # a run stopped early (pruned, failed) still closes its trackers
        if caller_owns_group:
            for tracker in accelerator.trackers:
                tracker.finish()
        else:
            accelerator.end_training()
    if run.push_to_hub and accelerator.is_main_process:  # last: everything is saved before any push
        accelerator.print(f"pushed to {push_run(out, run.push_to_hub, private=run.hub_private)}")
    return metrics


def resolved_config(cfg: TrainConfig, distill, run: RunArgs, extra: Dict, data: CifarData, accelerator: Accelerator,
                    precision: device.Precision) -> Dict:
    """What run_config.json records: every setting, the data, the hardware and the provenance."""
    sizes = {"num_train": len(data.train), "num_val": len(data.val) if data.val else 0, "num_test": len(data.test)}
    return {
        "train": dataclasses.asdict(cfg),
        "distill": dataclasses.asdict(distill) if distill else None,
        "run": dataclasses.asdict(run),
        **extra,
        "data": {**sizes, "class_names": data.class_names, "mean": data.mean, "std": data.std},
        # apart from "data", which a resumed run must match key for key: runs written before these keys resume
        "data_layout": {"image_column": data.image_column, "label_column": data.label_column, "test_split": data.test_split,
                        "image_shape": list(data.image_shape), "crop_padding": crop_padding(cfg, data), "decoded_bytes": data.nbytes},
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "precision_reason": precision.reason,
        "device": device.describe(accelerator.device),
        **provenance(),
    }


# What a resumed run must share with the run it continues: everything that changes what is
# learned. The process count and --grad-accum only split the same global batch differently.
RESUME_MUST_MATCH = ("train", "distill", "role", "method", "teacher", "data")
RESUME_MAY_CHANGE = ("grad_accum",)


def _resume_settings(resolved: Dict, may_change: Sequence[str]) -> Dict:
    flat = {"dataset": (resolved.get("run") or {}).get("dataset")}
    for section in RESUME_MUST_MATCH:
        values = with_defaults(section, resolved.get(section))  # a run saved before a field existed: its default
        if isinstance(values, dict):
            prefix = "data." if section == "data" else ""
            flat.update({prefix + k: v for k, v in values.items() if k not in may_change})
        else:
            flat[section] = values
    return flat


def changed_setting(saved: Dict, now: Dict, may_change: Sequence[str] = RESUME_MAY_CHANGE) -> Optional[Tuple[str, Any, Any]]:
    """The first setting that changes what is learned and differs between two resolved configs
    (run_config.json's content; `now` may hold only some of its sections, and a section it lacks
    is not compared): (key, saved, now), or None when they would learn the same. `may_change`:
    the train settings left out (a resumed run may split its batch otherwise)."""
    saved, now = _resume_settings(saved, may_change), _resume_settings(now, may_change)
    for key in now:
        if json.dumps(saved.get(key)) != json.dumps(now[key]):
            return key, saved.get(key), now[key]
    return None


def check_resumable(out: Path, resolved: Dict) -> None:
    saved = json.loads((out / "run_config.json").read_text())
    trained, now = saved.get("mixed_precision"), resolved["mixed_precision"]
    if trained and trained != now:  # its numbers differ, and fp16's loss scaler has a state the others lack
        raise UsageError(f"--resume: the checkpoint was trained in {device.Precision(trained, '').label}, this run is "
                         f"{device.Precision(now, '').label}; pass --mixed-precision {trained} or start a new --output-dir")
    changed = changed_setting(saved, resolved)
    if changed:
        key, saved, now = changed
        raise UsageError(f"--resume: {key} was {saved!r} in this run, now {now!r}; "
                         "resume with the run's settings or start a new --output-dir")


def startup_line(accelerator: Accelerator, precision: device.Precision, cfg: TrainConfig, steps_per_epoch: int) -> str:
    """Where and how the run trains, in one line: device, processes, precision and why, batch, steps."""
    processes = accelerator.num_processes
    per_process = cfg.batch_size // (processes * cfg.grad_accum)
    accumulation = f" x {cfg.grad_accum} accumulation steps" if cfg.grad_accum > 1 else ""
    return (f"start: {device.describe(accelerator.device)} | {processes} process{'es' if processes > 1 else ''} | "
            f"precision {precision.label} ({precision.reason}) | batch {cfg.batch_size} global, {per_process} per process{accumulation} | "
            f"{steps_per_epoch} steps per epoch, {cfg.epochs} epochs")


def fit(accelerator: Accelerator, method: Distiller, data: CifarData, cfg: TrainConfig, run: RunArgs, precision: device.Precision,
        on_epoch: Optional[EpochCallback] = None) -> Dict:
    out = Path(run.output_dir)
    train_loader, val_loader, test_loader = loaders(data, cfg, run, accelerator)
    if run.channels_last:
        method = method.to(memory_format=torch.channels_last)
        if method.teacher is not None:  # not a submodule: moved on its own
            method.teacher.to(memory_format=torch.channels_last)
    if run.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type == "cuda":
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            accelerator.print("--sync-bn: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process")
    optimizer = engine.make_optimizer(method, cfg)
    if run.compile:
        # compiled in place, inside DDP: the state_dict keys stay those of an uncompiled run (a
        # checkpoint resumes with or without --compile), and accelerate's unwrap_model has no
        # compiled wrapper to rewrite (with dynamo_backend it points the wrapper's _orig_mod past
        # DDP, and the ranks stop averaging their gradients)
        method.compile()
    method, optimizer = accelerator.prepare(method, optimizer)
    state = checkpoint.load(accelerator, out / CHECKPOINT) if run.resume else engine.TrainerState()
    if run.resume:  # a run stopped between its checkpoint and its history left the history an epoch behind
        write_history(accelerator, out, state)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    student = lambda: accelerator.unwrap_model(method).student  # noqa: E731
    accelerator.print(startup_line(accelerator, precision, cfg, steps_per_epoch))
    accelerator.print(f"{data.describe()}, crop padding {crop_padding(cfg, data)} px")
    epoch_seconds = []  # wall time of each epoch of this process, evaluation and checkpoint included
    while state.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        train_loader.set_epoch(state.epoch)
        record = engine.train_one_epoch(accelerator, method, optimizer, train_loader, cfg, state, total_steps, warmup_steps)
        state.epoch += 1
        record = {"epoch": state.epoch, "step": state.step, **record}
        if val_loader is not None:
            val = engine.evaluate(accelerator, student(), val_loader, data.class_names)
            record.update({f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))})  # scalars: no tables per epoch
        record["epoch_time_s"] = time.perf_counter() - epoch_start  # wall clock: training and validation
        score = record.get("val_f1_macro", state.epoch)  # no validation split: keep the last epoch
        improved = score > state.best_score
        if improved:
            state.best_epoch, state.best_score = state.epoch, score
        state.history.append(record)
        checkpoint.save(accelerator, method, state, out / CHECKPOINT, keep_current=improved)
        write_history(accelerator, out, state)
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=state.epoch)
        epoch_seconds.append(time.perf_counter() - epoch_start)
        remaining_s = sum(epoch_seconds) / len(epoch_seconds) * (cfg.epochs - state.epoch)
        accelerator.print(engine.summary_line(record, remaining_s))
        if on_epoch is not None:
            on_epoch(record)
    return finish(accelerator, student(), data, state, run, val_loader, test_loader)


def finish(accelerator: Accelerator, student, data: CifarData, state, run: RunArgs, val_loader, test_loader) -> Dict:
    """Evaluate the kept weights on val and test (test: unless --no-test-eval); export them,
    write the curves, the confusion matrix, the model card and, last, metrics.json, which marks
    the run done (a run cut short before it is resumed, not taken for finished)."""
    out = Path(run.output_dir)
    student.load_state_dict(checkpoint.kept_student(out / CHECKPOINT))
    metrics = {"test": engine.evaluate(accelerator, student, test_loader, data.class_names)} if run.test_eval else {}
    if val_loader is not None:
        metrics["val"] = engine.evaluate(accelerator, student, val_loader, data.class_names)
    metrics["kept_epoch"] = state.best_epoch
    metrics["selected_by"] = "best validation f1_macro" if val_loader is not None else "last epoch (no validation split)"
    metrics["epochs"] = state.epoch
    if accelerator.is_main_process:
        for split in ("test", "val"):
            warning = absent_classes_warning(metrics[split], split) if split in metrics else None
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        student.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
        weights = sum(v.numel() * v.element_size() for v in student.state_dict().values())
        with writing("the exported model, figures and metrics", out, weights + SMALL_FILES):
            export_model(student, out, data.class_names, data.mean, data.std, data.image_shape)
            plot_history(state.history, out / "curves.png")
            if run.test_eval:
                plot_confusion_matrix(metrics["test"]["confusion_matrix"], data.class_names, out / "confusion_matrix.png")
                write_model_card(out, run.push_to_hub, metrics)
            else:  # a finished run re-finished with --no-test-eval: no test figures left beside metrics.json
                for stale in (out / "confusion_matrix.png", out / CARD):
                    stale.unlink(missing_ok=True)
            write_json_atomic(out / "metrics.json", metrics)  # last: it marks the run done, its figures and card written
    if run.test_eval:
        accelerator.log(tracking.flat_metrics("test", metrics["test"]), step=state.epoch)
        tracking.log_confusion_matrix(accelerator, "test/confusion_matrix", metrics["test"]["confusion_matrix"], data.class_names, state.epoch)
    split = "test" if run.test_eval else "val"
    kept = metrics.get(split)
    scores = f"{split} (epoch {state.best_epoch} weights): accuracy={kept['accuracy']:.4f} f1_macro={kept['f1_macro']:.4f}" if kept else ""
    accelerator.print(f"{scores}{'' if run.test_eval else '; test not evaluated (--no-test-eval)'} -> {out}")
    return metrics
