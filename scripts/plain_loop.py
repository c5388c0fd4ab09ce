"""A plain PyTorch training loop, written apart from kd's data, engine and runner, to check that
our loop matches it at an equal budget (the same model, epochs, batch, lr, recipe):

    python scripts/plain_loop.py DATASET_DIR --model cifar_resnet8 --epochs 2 --lr 0.1 --batch-size 256
    python train_student.py --dataset DATASET_DIR --model cifar_resnet8 --epochs 2 --lr 0.1 --batch-size 256 --mixed-precision no

Recipe, as in kd's docs: random 32x32 crop of the 4-pixel zero-padded image and horizontal flip,
normalised by the training set's per-channel mean/std; SGD with Nesterov momentum 0.9, weight
decay 5e-4 on conv/linear weights only; linear warm-up for 1 epoch, then cosine decay per step;
a stratified validation split of 5000 training images (this script's own draw). fp32, or bf16
autocast around the forward and the loss with --bf16 (what kd picks where bf16 is native).
Prints validation and test accuracy after the last epoch."""

import argparse
import io
import math
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
    """Stratified: the same share of each class in the held-out part."""
    rng, classes = np.random.default_rng(seed), labels.unique()
    val = np.concatenate([rng.permutation(np.flatnonzero(labels.numpy() == c))[: size // len(classes)] for c in classes.tolist()])
    mask = np.ones(len(labels), bool)
    mask[val] = False
    return torch.from_numpy(np.flatnonzero(mask)), torch.from_numpy(val)


def crop_flip(batch: torch.Tensor) -> torch.Tensor:
    padded = F.pad(batch, (4, 4, 4, 4))
    out = torch.empty_like(batch)
    for i, (dy, dx) in enumerate(torch.randint(0, 9, (len(batch), 2)).tolist()):
        out[i] = padded[i, :, dy:dy + 32, dx:dx + 32]
    flip = torch.rand(len(batch)) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def accuracy(model, images, labels, mean, std, batch=1000) -> float:
    model.eval()
    correct = sum((model((images[i:i + batch].float() / 255 - mean) / std).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(labels), batch))
    return correct / len(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", default="cifar_resnet8")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward and the loss (default: fp32)")
    args = parser.parse_args()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)  # noqa: E731
    torch.manual_seed(args.seed)
    train_images, train_labels = read_split(args.dataset, "train")
    test_images, test_labels = read_split(args.dataset, "test")
    train_index, val_index = hold_out(train_labels, args.val_size)
    (val_images, val_labels), (train_images, train_labels) = (train_images[val_index], train_labels[val_index]), (train_images[train_index], train_labels[train_index])
    pixels = train_images.float() / 255
    mean, std = pixels.mean((0, 2, 3)).view(1, 3, 1, 1), pixels.std((0, 2, 3)).view(1, 3, 1, 1)
    del pixels
    model = timm.create_model(args.model, num_classes=int(train_labels.max()) + 1)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train_labels) // args.batch_size  # whole batches only, as kd does
    total, warmup, step = args.epochs * steps_per_epoch, steps_per_epoch, 0
    for epoch in range(args.epochs):
        model.train()
        start, order = time.perf_counter(), torch.randperm(len(train_labels))
        for i in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            index = order[i:i + args.batch_size]
            lr = args.lr * (step + 1) / warmup if step < warmup else args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = (crop_flip(train_images[index]).float() / 255 - mean) / std
            with autocast():
                loss = F.cross_entropy(model(images).float(), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        val = accuracy(model, val_images, val_labels, mean, std)
        print(f"epoch {epoch + 1}: loss {loss.item():.4f} val_acc {val:.4f} {steps_per_epoch * args.batch_size / (time.perf_counter() - start):.0f} img/s", flush=True)
    print(f"plain loop {args.model} {args.epochs} epochs {'bf16' if args.bf16 else 'fp32'}: val accuracy {accuracy(model, val_images, val_labels, mean, std):.4f} "
          f"test accuracy {accuracy(model, test_images, test_labels, mean, std):.4f}")


if __name__ == "__main__":
    main()
