"""The one training loop. It trains a method (kd.distillers) and never knows which one:
the method returns (logits, {name: weighted loss}) and the loop sums the dict."""

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from kd.config import TrainConfig
from kd.data import DeviceLoader
from kd.errors import RunError
from kd.util.text import format_duration
from kd.train.metrics import classification_report

PROGRESS_EVERY = 20  # steps between progress-bar updates (each one syncs the device)


@dataclass
class TrainerState:
    """Everything the loop needs to continue after a restart, saved as JSON in each checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_epoch: int = 0  # the epoch whose weights are kept (1-based; 0: none yet)
    best_score: float = -math.inf
    history: List[Dict] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return asdict(self)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, milestones: Sequence[int] = (), decay: float = 0.1) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0; or, with
    `milestones` (optimizer steps), step decay: `peak` times `decay` for each milestone reached."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if milestones:
        return peak * decay ** sum(step >= milestone for milestone in milestones)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(method: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = method.get_learnable_parameters()
    decay = [p for p in params if p.ndim > 1]  # conv and linear weights
    no_decay = [p for p in params if p.ndim <= 1]  # BN affine and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def train_one_epoch(accelerator: Accelerator, model, optimizer, loader: DeviceLoader, cfg: TrainConfig, state: TrainerState, total_steps: int, warmup_steps: int) -> Dict[str, float]:
    """One pass over the training data. Returns the epoch's mean loss terms, lr and images/s."""
    model.train()
    sums: Dict[str, torch.Tensor] = {}
    first_bad_step = torch.tensor(-1, device=accelerator.device)
    micro_steps = len(loader) // cfg.grad_accum * cfg.grad_accum  # whole optimizer steps only
    shown = accelerator.is_local_main_process and sys.stderr.isatty()  # a bar nobody sees reads no loss: no device sync
    bar = tqdm(total=micro_steps, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", disable=not shown, leave=False)
    images_seen, start = 0, time.perf_counter()
    method = accelerator.unwrap_model(model)
    milestones = [round(epoch * (micro_steps // cfg.grad_accum)) for epoch in cfg.lr_milestones]  # epochs -> optimizer steps
    for micro_step, (images, labels, index) in enumerate(loader):
        if micro_step == micro_steps:
            break
        lr = learning_rate(state.step, total_steps, warmup_steps, cfg.lr, milestones, cfg.lr_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # for methods with schedules (DKD's warm-up); counted in optimizer steps, as the processes count them
        method.set_progress(state.epoch + micro_step // cfg.grad_accum * cfg.grad_accum / micro_steps, cfg.epochs)
        with accelerator.accumulate(model):
            _, terms = model(images, labels, index)  # index: dataset indices, for per-image state (CRD's banks)
            loss = sum(terms.values())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            state.step += 1
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
        # remember the first non-finite step without a device sync on every step
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), state.step, first_bad_step)
        images_seen += len(labels) * accelerator.num_processes
        if shown and ((micro_step + 1) % PROGRESS_EVERY == 0 or micro_step + 1 == micro_steps):
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.3g}", img_s=f"{images_seen / elapsed:.0f}")
            bar.update(micro_step + 1 - bar.n)
    bar.close()
    # one collective per epoch: the logged losses are means over all processes' images
    means = {name: float(accelerator.reduce(total, reduction="mean")) / micro_steps for name, total in sums.items()}
    first_bad_step = accelerator.gather(first_bad_step[None]).max()  # every process stops together
    if int(first_bad_step) >= 0 or not all(map(math.isfinite, means.values())):
        terms_text = ", ".join(f"{k}={v:.4g}" for k, v in means.items())
        # a checkpoint is saved after every epoch: epoch 0 has none
        kept = f"the last good checkpoint (epoch {state.epoch}) is kept" if state.epoch else "no checkpoint was saved yet"
        raise RunError(f"non-finite loss at step {int(first_bad_step)} of epoch {state.epoch + 1} ({terms_text}); "
                       f"stopped, {kept}; try a lower --lr")
    elapsed = time.perf_counter() - start
    return {**means, "loss": sum(means.values()), "lr": lr, "images_per_s": images_seen / elapsed, "train_time_s": elapsed}


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DeviceLoader, class_names: List[str]) -> Dict:
    """Metrics over the whole split, every image counted exactly once over all processes.
    BatchNorm statistics are taken from the main process first, so every process evaluates
    the same weights that the main process saves."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            buffer.copy_(broadcast(buffer, from_process=0))
    was_training = model.training
    model.eval()
    predictions, references, indices = [], [], []
    for images, labels, index in loader:
        with accelerator.autocast():
            logits = model(images)
        predictions.append(logits.argmax(1))
        references.append(labels)
        indices.append(index)
    model.train(was_training)
    predictions, references, indices = accelerator.gather_for_metrics((torch.cat(predictions), torch.cat(references), torch.cat(indices)))
    real = indices >= 0  # drop the padding of short last slices
    return classification_report(predictions[real].cpu().numpy(), references[real].cpu().numpy(), class_names)


def summary_line(record: Dict, remaining_s: float) -> str:
    """The epoch's line; `remaining_s`: the estimated time to the end of the run."""
    terms = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("loss"))
    val = f" val_acc={record['val_accuracy']:.4f} val_f1={record['val_f1_macro']:.4f}" if "val_accuracy" in record else ""
    left = f" | {format_duration(remaining_s)} left" if remaining_s > 0 else ""
    return f"epoch {record['epoch']}: {terms} lr={record['lr']:.4g} {record['images_per_s']:.0f} img/s{val}{left}"
