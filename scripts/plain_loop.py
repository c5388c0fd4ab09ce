"""A plain PyTorch training loop, written apart from kd's data, engine and runner, to check that
our loop matches it at an equal budget (the same model, epochs, batch, lr, recipe):

    python scripts/plain_loop.py DATASET_DIR --model cifar_resnet8 --epochs 2 --lr 0.1 --batch-size 256
    python train_student.py --dataset DATASET_DIR --model cifar_resnet8 --epochs 2 --lr 0.1 --batch-size 256 --mixed-precision no

Recipe, as in kd's docs: random 32x32 crop of the 4-pixel zero-padded image and horizontal flip,
normalised by the training set's per-channel mean/std; SGD with Nesterov momentum 0.9, weight
decay 5e-4 on conv/linear weights only; linear warm-up for 1 epoch, then cosine decay per step;
a stratified validation split of 5000 training images (this script's own draw). fp32, or
autocast around the forward and the loss with --precision bf16 (what kd picks where bf16 is
native) or fp16 (with loss scaling; CUDA only). On the GPU when there is one.
Keeps the weights of the epoch with the best validation macro F1 (the last one with --val-size 0),
as kd does, and prints their test accuracy and macro F1; with --output-dir, writes there
metrics.json (the kept epoch's validation and test accuracy and macro F1, the settings) and
history.jsonl (one line per epoch), which is how `python -m kd.leaderboard` runs it beside the
student baseline. It keeps no checkpoint: an interrupted run starts over."""

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import timm
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kd.models  # noqa: E402,F401  registers the cifar_* architectures with timm; nothing else of kd is used


def read_split(folder: Path, split: str):
    table = pq.read_table(next((folder / "plain_text").glob(f"{split}-*.parquet"))).to_pydict()
    column = "img" if "img" in table else "image"
    images = np.stack([np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in table[column]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(table["label"])


def hold_out(labels: torch.Tensor, size: int, seed: int = 0):
    """Stratified: each class gives its share of `size`, rounded by largest remainder so that
    exactly `size` images are held out."""
    rng, labels_np = np.random.default_rng(seed), labels.numpy()
    classes, counts = np.unique(labels_np, return_counts=True)
    quota = counts * size / len(labels_np)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: size - take.sum()]] += 1
    val = np.concatenate([rng.permutation(np.flatnonzero(labels_np == c))[:k] for c, k in zip(classes, take)])
    mask = np.ones(len(labels), bool)
    mask[val] = False
    return torch.from_numpy(np.flatnonzero(mask)), torch.from_numpy(val)


def schedule(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay per step down to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def crop_flip(batch: torch.Tensor) -> torch.Tensor:
    padded = F.pad(batch, (4, 4, 4, 4))
    out = torch.empty_like(batch)
    for i, (dy, dx) in enumerate(torch.randint(0, 9, (len(batch), 2)).tolist()):
        out[i] = padded[i, :, dy:dy + 32, dx:dx + 32]
    flip = torch.rand(len(batch), device=batch.device) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def predict(model, images, mean, std, autocast, batch=1000) -> torch.Tensor:
    model.eval()
    with autocast():
        return torch.cat([model((images[i:i + batch].float() / 255 - mean) / std).argmax(1) for i in range(0, len(images), batch)])


def scores(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> dict:
    """Accuracy and macro F1 (F1 per class from its true and false positives and negatives, 0
    for a class never predicted nor present, then the plain mean over classes)."""
    predicted, labels = predicted.cpu(), labels.cpu()
    hits = torch.bincount(labels[predicted == labels], minlength=classes).double()
    predicted_count = torch.bincount(predicted, minlength=classes).double()
    true_count = torch.bincount(labels, minlength=classes).double()
    f1 = torch.where(predicted_count + true_count > 0, 2 * hits / (predicted_count + true_count), torch.zeros(classes, dtype=torch.double))
    return {"accuracy": (predicted == labels).double().mean().item(), "f1_macro": f1.mean().item()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="a local folder in the Hub's layout (plain_text/{train,test}-*.parquet)")
    parser.add_argument("--model", default="cifar_resnet8")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast around the forward and the loss (fp16: with loss scaling, CUDA only)")
    parser.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="the same as --precision bf16")
    parser.add_argument("--output-dir", type=Path, help="write metrics.json and history.jsonl there")
    parser.add_argument("--overwrite", action="store_true", help="accepted for the leaderboard's scheduler: the run always starts over")
    return parser


def main():
    args = build_parser().parse_args()
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")  # where kd's runs train too
    device = torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    if args.precision == "fp16" and device.type != "cuda":
        sys.exit("plain_loop.py: --precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    torch.manual_seed(args.seed)
    train_images, train_labels = read_split(args.dataset, "train")
    test_images, test_labels = read_split(args.dataset, "test")
    classes = int(train_labels.max()) + 1
    if not 0 <= args.val_size < len(train_labels):
        sys.exit(f"plain_loop.py: --val-size {args.val_size} must be at least 0 and leave training images of the {len(train_labels)}")
    train_index, val_index = hold_out(train_labels, args.val_size)
    (val_images, val_labels), (train_images, train_labels) = (train_images[val_index], train_labels[val_index]), (train_images[train_index], train_labels[train_index])
    train_images, val_images, test_images = train_images.to(device), val_images.to(device), test_images.to(device)
    pixels = train_images.float() / 255
    mean, std = pixels.mean((0, 2, 3)).view(1, 3, 1, 1), pixels.std((0, 2, 3)).view(1, 3, 1, 1)
    del pixels
    model = timm.create_model(args.model, num_classes=classes).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=args.momentum, nesterov=True)
    steps_per_epoch = len(train_labels) // args.batch_size  # whole batches only, as kd does
    if steps_per_epoch == 0:
        sys.exit(f"plain_loop.py: --batch-size {args.batch_size} is larger than the {len(train_labels)} training images")
    total, warmup, step = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch), 0
    history, best, kept = [], None, None  # kept: the weights of the epoch with the best validation macro F1, as kd keeps
    for epoch in range(args.epochs):
        model.train()
        start, order = time.perf_counter(), torch.randperm(len(train_labels))
        for i in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            index = order[i:i + args.batch_size]
            lr = schedule(step, total, warmup, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = (crop_flip(train_images[index.to(device)]).float() / 255 - mean) / std
            with autocast():
                loss = F.cross_entropy(model(images).float(), train_labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
        val = scores(predict(model, val_images, mean, std, autocast), val_labels, classes) if len(val_labels) else None
        if val and (best is None or val["f1_macro"] > best[1]["f1_macro"]):
            best, kept = (epoch + 1, val), {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch + 1, "loss": loss.item(), **({"val_accuracy": val["accuracy"], "val_f1_macro": val["f1_macro"]} if val else {}),
                        "epoch_time_s": seconds})
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}" + (f" val_acc {val['accuracy']:.4f}" if val else "")
              + f" {steps_per_epoch * args.batch_size / seconds:.0f} img/s", flush=True)
    if kept is not None:
        model.load_state_dict(kept)
    test = scores(predict(model, test_images, mean, std, autocast), test_labels, classes)
    chosen = f"epoch {best[0]} (best validation F1 macro {best[1]['f1_macro']:.4f})" if best else "the last epoch (no validation split)"
    print(f"plain loop {args.model} {args.epochs} epochs {args.precision}, weights of {chosen}: "
          f"test accuracy {test['accuracy']:.4f} test F1 macro {test['f1_macro']:.4f}")
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "history.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key not in ("output_dir", "overwrite")}
        metrics = {"val": best[1] if best else None, "test": test, "kept_epoch": best[0] if best else args.epochs, "settings": settings,
                   "device": device.type, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
        partial = args.output_dir / "metrics.json.partial"
        partial.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(partial, args.output_dir / "metrics.json")  # last, whole: its presence means done

if __name__ == "__main__":
    main()
