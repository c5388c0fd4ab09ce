"""A split's images decoded once into one uint8 tensor (N x 3 x H x W) and cached on disk as
safetensors: every image as RGB (grayscale repeated into three channels, an alpha channel
dropped, said in a note), resized at decode time where `image_size` is given, and a file that
cannot be decoded named by its split and row."""

import hashlib
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from kd.errors import UsageError

ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BATCH_ROWS = 1000  # rows read from the arrow table at a time: the encoded bytes never all sit in memory


def cache_dir() -> Path:
    return Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd"))


def open_image(item, split_name: str, row: int) -> Image.Image:
    """The image of one row, fully read; a file PIL cannot read is one line naming its row."""
    if item is None:
        raise UsageError(f"the {split_name} split has no image at row {row}; remove that row or fill it in")
    try:
        data = item["bytes"] if item["bytes"] is not None else Path(item["path"]).read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()  # a truncated file fails here, not later in convert()
        return image
    except (OSError, ValueError, SyntaxError, TypeError) as error:  # UnidentifiedImageError is an OSError
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise UsageError(f"the {split_name} split's image at row {row} cannot be decoded ({type(error).__name__}: {reason}); "
                         "replace or remove that row") from error


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    with warnings.catch_warnings():  # PIL warns about palette transparency; the caller's note says it instead
        warnings.simplefilter("ignore")
        return image.convert("RGB")


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """The shorter side to `size`, then the centre `size` x `size`: what timm's evaluation
    transform does with crop_pct 1.0 (the exported config's), so a user's preprocessing
    from timm.data.resolve_model_data_config matches training."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def size_list(sizes: Counter) -> str:
    return ", ".join(f"{w}x{h} ({n} image{'s' if n > 1 else ''})" for (w, h), n in sizes.most_common())


def _raw(split, image_column: str):
    from datasets import Image as ImageFeature

    return split.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))


def first_size(split, image_column: str, row: int, split_name: str) -> Tuple[int, int]:
    """(width, height) of one row's image, from its header."""
    item = _raw(split, image_column)[int(row)][image_column]
    return open_image(item, split_name, row).size


def decode(split, image_column: str, rows: Sequence[int], split_name: str, image_size: Optional[int]) -> Tuple[torch.Tensor, List[str]]:
    """The images of `rows`, as uint8 N x 3 x H x W, and notes for the user (alpha dropped).
    Images of several sizes (with no `image_size`) are refused in one line that names them."""
    raw = _raw(split, image_column)
    rows = list(map(int, rows))
    if rows != list(range(len(split))):
        raw = raw.select(rows)
    array, sizes, alpha = None, Counter(), Counter()
    for start in range(0, len(rows), BATCH_ROWS):
        for offset, item in enumerate(raw[start : start + BATCH_ROWS][image_column]):
            position = start + offset
            image = open_image(item, split_name, rows[position])
            if has_alpha(image):
                alpha[image.mode] += 1
            image = to_rgb(image)
            if image_size:
                image = resize_square(image, image_size)
            sizes[image.size] += 1
            if array is None:
                array = np.empty((len(rows), 3, image.size[1], image.size[0]), dtype=np.uint8)
            if len(sizes) == 1:  # once sizes differ, only count them: the message names them all
                array[position] = np.asarray(image).transpose(2, 0, 1)
    if len(sizes) > 1:
        raise UsageError(f"the {split_name} split's images have {len(sizes)} sizes: {size_list(sizes)}; "
                         "pass --image-size N to resize every image to N x N when decoding")
    notes = []
    if alpha:
        notes.append(f"{sum(alpha.values())} of {len(rows)} {split_name} images have an alpha channel "
                     f"({', '.join(alpha)}); it is dropped, keeping the colour under transparent pixels")
    if array is None:
        array = np.empty((0, 3, image_size or 0, image_size or 0), dtype=np.uint8)
    return torch.from_numpy(array), notes


def cache_key(split, image_column: str, image_size: Optional[int], rows: Optional[Sequence[int]] = None) -> str:
    """Names the cached decode of a split (all rows when `rows` is None). A whole split at its
    own size keeps the key of the earlier cache format, so existing caches stay valid."""
    text = f"{split._fingerprint}:{image_column}"
    if image_size:
        text += f":size{image_size}"
    if rows is not None:
        text += ":rows" + hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_shape(split, image_column: str, image_size: Optional[int], rows: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """(C, H, W) of an already cached decode that covers `rows`, read from the file's header."""
    from safetensors import safe_open

    for path in _cache_paths(split, image_column, image_size, rows):
        if path.exists():
            with safe_open(path, "pt") as handle:
                return tuple(handle.get_slice("images").get_shape()[1:])
    return None


def _cache_paths(split, image_column: str, image_size: Optional[int], rows: Sequence[int]) -> List[Path]:
    whole = cache_dir() / f"{cache_key(split, image_column, image_size)}.safetensors"
    if len(rows) == len(split):
        return [whole]
    return [whole, cache_dir() / f"{cache_key(split, image_column, image_size, rows)}.safetensors"]


def decoded(split, image_column: str, rows: Sequence[int], split_name: str, image_size: Optional[int]) -> Tuple[torch.Tensor, List[str]]:
    """The images of `rows`, decoded once: later runs (and the other processes) read them back
    from the cache, the whole split's decode if one is there, else that of these rows."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    paths = _cache_paths(split, image_column, image_size, rows)
    for index, path in enumerate(paths):
        if path.exists():
            images = load_file(path)["images"]
            with safe_open(path, "pt") as handle:
                notes = json.loads((handle.metadata() or {}).get("notes", "[]"))
            return (images[torch.as_tensor(rows, dtype=torch.int64)] if index == 0 and len(paths) > 1 else images), notes
    path = paths[-1]
    print(f"decoding {len(rows)} {split_name} images once; cached as {path}", flush=True)
    images, notes = decode(split, image_column, rows, split_name, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"images": images.contiguous()}, tmp, metadata={"notes": json.dumps(notes)})
    os.replace(tmp, path)  # atomic: a second process never reads half a file
    return images, notes
