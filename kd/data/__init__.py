"""Image classification data: loaded through `datasets`, its columns and splits found (or
named by flags), decoded once into a uint8 tensor (N x 3 x H x W, kd.data.images) cached on disk,
kept on the training device, augmented a whole batch at a time (airbench's approach: no PIL
and no worker processes in the hot loop)."""

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from kd.data import images as image_files
from kd.errors import UsageError
from kd.data.images import cache_dir  # noqa: F401  (where the decoded splits are cached; tests and tools read it here)
from kd.data.layout import IMAGE_COLUMNS, Layout, class_labels, column_list, eval_split_name, find_columns  # noqa: F401

HUB_DATASET = "uoft-cs/cifar10"


def default_dataset() -> str:
    """$KD_DATASET, read when a command line is parsed (not at import), else the Hub's CIFAR-10."""
    return os.environ.get("KD_DATASET", HUB_DATASET)

VAL_SPLIT_SEED = 0  # the held-out validation split never changes with --seed
DEVICE_SHARE = 0.8  # of a GPU's free memory the decoded set may take: the rest is the model's and the batches'


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    def head(self, n: Optional[int]) -> "Split":
        return self if n is None or n >= len(self) else Split(self.images[:n], self.labels[:n])


@dataclass
class CifarData:
    train: Split
    val: Optional[Split]
    test: Split
    class_names: List[str]
    mean: Tuple[float, ...]  # per channel, of the training images, in [0, 1]
    std: Tuple[float, ...]
    test_split: str = "test"  # the dataset's split that `test` holds
    image_column: str = "img"
    label_column: str = "label"
    notes: List[str] = field(default_factory=list)  # said once to the user (an alpha channel dropped)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def nbytes(self) -> int:
        """The decoded images held on the device: train, validation and test."""
        return sum(s.images.numel() for s in (self.train, self.val, self.test) if s is not None)

    def describe(self) -> str:
        """One line for the start-up output: the columns, the splits, the image size and the memory."""
        c, h, w = self.image_shape
        val = f", {len(self.val)} validation (held out of train)" if self.val is not None else ""
        return (f"data: {len(self.train)} train{val}, {len(self.test)} test from split {self.test_split!r}; "
                f"{self.num_classes} classes from column {self.label_column!r}, {c}x{h}x{w} images from {self.image_column!r}, "
                f"{format_bytes(self.nbytes)} uint8 on the device")


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def is_local_dataset(dataset: str) -> bool:
    """A folder on disk rather than a Hub id: it exists, starts like a path, or has more than one '/'."""
    return Path(dataset).expanduser().exists() or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1


def folder_signature(folder: Path) -> str:
    """Which version of a local data set folder this is: its resolved path, and each file's path
    in it, size and modification time (hidden files and folders aside: .git, .cache)."""
    folder = folder.resolve()
    files = [folder] if folder.is_file() else sorted(
        path for path in folder.rglob("*") if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    digest = hashlib.sha256(str(folder).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _load_dataset_dict(dataset: str):
    import datasets

    datasets.disable_progress_bars()  # our own output stays readable; decoding says what it does
    local = Path(dataset).expanduser()
    looks_local = is_local_dataset(dataset)
    if looks_local and not local.exists():
        raise UsageError(f"dataset folder {dataset} does not exist; pass --dataset with a folder that holds the parquet files")
    try:
        if not looks_local:
            return datasets.load_dataset(dataset)
        # datasets (5.2) keys its cache of a folder whose card declares the splits by the folder's
        # name and that card: a same-named folder elsewhere, or files changed in place, would read
        # the first rows it cached. Each version of a folder gets a cache (and a fingerprint, which
        # names kd's decoded copy) of its own.
        signature = folder_signature(local)
        loaded = datasets.load_dataset(str(local), cache_dir=str(Path(datasets.config.HF_DATASETS_CACHE) / "kd-local" / signature[:20]))
        return datasets.DatasetDict({name: datasets.Dataset(split.data, info=split.info, split=split.split,
                                                            fingerprint=hashlib.sha256(f"{signature}:{name}".encode()).hexdigest()[:16])
                                     for name, split in loaded.items()})
    except Exception as error:  # datasets raises many types; all mean "could not load"
        if looks_local:
            raise UsageError(f"could not read a dataset from {dataset}: {error}") from error
        raise UsageError(
            f"could not load dataset {dataset!r} from the Hugging Face Hub ({type(error).__name__}); "
            "if you are offline, pass a local copy with --dataset PATH"
        ) from error


def available_memory(device: Optional[torch.device]) -> Tuple[int, str]:
    """(bytes the decoded set may take, where): a share of a GPU's free memory, else the free host memory."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEVICE_SHARE), f"{device} ({DEVICE_SHARE:.0%} of its {format_bytes(free)} free)"
    import psutil  # an accelerate dependency

    return psutil.virtual_memory().available, "the host's available memory"


def check_fits(counts: Dict[str, int], shape: Sequence[int], device: Optional[torch.device], copies: int = 1) -> None:
    """Refuse, before decoding, a set that would not fit where it is held: a GPU holds each
    process's own copy; on the CPU the host memory holds `copies` (one per process)."""
    held = 1 if device is not None and device.type == "cuda" else copies
    per_image = int(torch.Size(shape).numel()) * held
    images = sum(counts.values())
    needed = images * per_image
    budget, where = available_memory(device)
    if needed <= budget:
        return
    side = int((budget / (shape[0] * held * images)) ** 0.5)
    train = budget // per_image - counts.get("eval", 0)  # what fits beside the evaluation images
    fixes = [f"--image-size {side} or less"] + ([f"--max-train-samples {train} or less"] if train > 0 else [])
    counted = ", ".join(f"{n} {name}" for name, n in counts.items())
    raise UsageError(f"the decoded images would take {format_bytes(needed)} ({counted} images of {'x'.join(map(str, shape))} uint8"
                     f"{f', {held} copies' if held > 1 else ''}) but {where} is {format_bytes(budget)}; pass {' or '.join(fixes)} "
                     "(streaming a larger set: docs/datasets.md)")


def _plan_shape(split, image_column: str, rows, split_name: str, image_size: Optional[int]) -> Tuple[int, int, int]:
    if image_size:
        return 3, image_size, image_size
    cached = image_files.cached_shape(split, image_column, image_size, rows)
    if cached:
        return cached
    width, height = image_files.first_size(split, image_column, rows[0], split_name) if len(rows) else (0, 0)
    return 3, height, width


def stratified_split(labels: torch.Tensor, val_size: int, seed: int = VAL_SPLIT_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with each class's share of val equal to its share of labels."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * val_size / len(labels)
    take = quota.floor().long()
    # hand the remaining places to the classes with the largest fractional remainders
    for i in torch.argsort(quota - take, descending=True)[: val_size - int(take.sum())]:
        take[i] += 1
    train_index, val_index = [], []
    for cls, n in zip(classes, take):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val_index.append(members[:n])
        train_index.append(members[n:])
    return torch.cat(train_index).sort().values, torch.cat(val_index).sort().values


def load_cifar(
    dataset: str = HUB_DATASET,
    val_size: int = 5000,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    layout: Layout = Layout(),
    device: Optional[torch.device] = None,
    copies: int = 1,
) -> CifarData:
    """The dataset's train split (less `val_size` images held out, stratified) and its evaluation
    split, decoded: only the rows used, after a check that they fit on `device` (`copies`:
    processes that each hold the set in the host memory)."""
    dataset_dict = _load_dataset_dict(dataset)
    test_name = eval_split_name(dataset_dict, dataset, layout.test_split)
    train_split, test_split = dataset_dict["train"], dataset_dict[test_name]
    image_column, label_column = find_columns(train_split.features, dataset, layout.image_column, layout.label_column)
    for column in (image_column, label_column):
        if column not in test_split.features:
            raise UsageError(f"the {test_name} split of {dataset} has no column {column!r} (its columns: {column_list(test_split.features)})")
    class_names, labels = class_labels(dataset_dict, ("train", test_name), label_column, dataset)
    full_train_labels = labels["train"]
    if not 0 <= val_size < len(full_train_labels):
        raise UsageError(f"--val-size {val_size} must be in [0, {len(full_train_labels)}) for this dataset's {len(full_train_labels)} training images")
    train_rows, val_rows = torch.arange(len(full_train_labels)), torch.arange(0)
    if val_size:
        train_rows, val_rows = stratified_split(full_train_labels, val_size)
    train_rows, val_rows = train_rows[:max_train_samples], val_rows[:max_eval_samples]
    test_rows = torch.arange(len(labels[test_name]))[:max_eval_samples]
    needed = torch.cat([train_rows, val_rows]).sort().values  # the rows of train decoded: the run's share and its validation
    shape = _plan_shape(train_split, image_column, needed.tolist(), "train", layout.image_size)
    check_fits({"train": len(train_rows), "eval": len(val_rows) + len(test_rows)}, shape, device, copies)
    train_images, train_notes = image_files.decoded(train_split, image_column, needed.tolist(), "train", layout.image_size)
    test_images, test_notes = image_files.decoded(test_split, image_column, test_rows.tolist(), test_name, layout.image_size)
    if train_images.shape[1:] != test_images.shape[1:] and len(test_images):
        (_, h, w), (_, th, tw) = train_images.shape[1:], test_images.shape[1:]
        raise UsageError(f"the train images are {w}x{h} but the {test_name} images are {tw}x{th}; "
                         "pass --image-size N to resize them all to N x N when decoding")
    # row of train -> its place in train_images; no copy where train is all that was decoded
    take = lambda rows: train_images if len(rows) == len(needed) else train_images[torch.searchsorted(needed, rows)]  # noqa: E731
    train = Split(take(train_rows), full_train_labels[train_rows])
    val = Split(take(val_rows), full_train_labels[val_rows]) if val_size else None
    test = Split(test_images, labels[test_name][test_rows])
    mean, std = channel_stats(train.images)
    return CifarData(train=train, val=val, test=test, class_names=class_names, mean=mean, std=std, test_split=test_name,
                     image_column=image_column, label_column=label_column, notes=train_notes + test_notes)


def default_crop_padding(image_shape: Sequence[int]) -> int:
    """Zero padding of the random crop: CIFAR's 4 pixels at 32 and below, an eighth of the
    shorter side above (8 at 64, 28 at 224)."""
    return max(4, round(min(image_shape[-2:]) / 8))


def random_crop_flip(n: int, generator: torch.Generator, pad: int = 4) -> Tuple[torch.Tensor, ...]:
    """Per-image crop offsets (dy, dx in [0, 2*pad]) and flip flags, drawn for a whole batch."""
    device = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return dy, dx, flip


def augment(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each image of a uint8 batch at (dy, dx) out of its `pad`-pixel zero padding,
    mirrored where `flip`: one flat gather for the whole batch (7x faster on CPU than
    4-tensor advanced indexing)."""
    n, channels, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=device)  # n, h
    cols = dx[:, None] + torch.arange(w, device=device)  # n, w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, channels, h * w)
    return padded.view(n, channels, -1).gather(2, flat).view(n, channels, h, w)


def channel_stats(images: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 images, from 256-bin histograms (no float
    copy of the data set)."""
    counts = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256) for c in range(images.shape[1])]).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    std = ((counts * (values - mean[:, None]) ** 2).sum(1) / (n - 1)).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class DeviceLoader:
    """Batches from a Split held on `device`, sharded over processes by slicing the global batch.

    Every process draws the same permutation and the same augmentation for the whole global
    batch, then keeps its own slice: N processes see exactly what one process sees.
    """

    def __init__(
        self,
        split: Split,
        global_batch_size: int,
        device: torch.device,
        mean: Tuple[float, ...],
        std: Tuple[float, ...],
        train: bool,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        channels_last: bool = False,
        crop_padding: Optional[int] = None,
    ):
        self.images = split.images.to(device)
        # random-crop padding in pixels (training only); None: default_crop_padding of the image size
        self.crop_padding = default_crop_padding(split.images.shape) if crop_padding is None else crop_padding
        self.labels = split.labels.to(device)
        self.global_batch_size = global_batch_size
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.train = train
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.global_batch_size if self.train else -(-n // self.global_batch_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _my_slice(self, index: torch.Tensor) -> torch.Tensor:
        per_process = -(-len(index) // self.num_processes)
        return index[self.process_index * per_process : (self.process_index + 1) * per_process]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yields (images, labels, index). In evaluation every image comes exactly once over
        all processes; a process with a short last slice pads with index -1 so that all
        processes yield tensors of one shape for gathering."""
        n = len(self.labels)
        order = torch.arange(n, device=self.device)
        if self.train:
            # the epoch's order and every image's crop and flip, drawn once from (seed, epoch): the
            # same whatever the number of processes, the accumulation steps or the batch size
            generator = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator, device=self.device)
            dy, dx, flip = random_crop_flip(n, generator, self.crop_padding)
        for step in range(len(self)):
            positions = torch.arange(step * self.global_batch_size, min(n, (step + 1) * self.global_batch_size), device=self.device)
            if self.train:
                mine = self._my_slice(positions)
                images = augment(self.images[order[mine]], dy[mine], dx[mine], flip[mine], self.crop_padding)
                yield self.normalize(images), self.labels[order[mine]], order[mine]
                continue
            index = order[positions]
            mine = self._my_slice(index)
            per_process = -(-len(index) // self.num_processes)
            padding = per_process - len(mine)
            if padding:
                mine = torch.cat([mine, torch.full((padding,), -1, device=self.device, dtype=mine.dtype)])
            safe = mine.clamp(min=0)
            yield self.normalize(self.images[safe]), self.labels[safe], mine
