"""One function per figure of the benchmark; each returns its rows of the table."""

import copy
import time
from dataclasses import dataclass
from typing import List

import torch

from kd.bench.isolated import StepProcess, run_isolated
from kd.train import device as devices
from kd.bench.timing import STUDENT, TEACHER, Row, bare_step, create_model, memory_name, random_batch, time_steps
from kd.config import DistillConfig, TrainConfig
from kd.data import IMAGE_COLUMNS, CifarData, DeviceLoader
from kd.distillers import DISTILLERS, FrozenTeacher, Supervised, build_distiller
from kd.train.engine import TrainerState, make_optimizer, train_one_epoch

MEMORY_LIMIT_MB = 4096  # the teacher's full-data run should fit a 4 GB machine (its RAM: a CPU run's target only)


@dataclass(frozen=True)
class Settings:
    dataset: str
    threads: int
    device_type: str  # "cpu" or "cuda": every figure trains there
    precision: str  # what the policy picks (kd.train.device): "no", "bf16" or "fp16"; figure 5 also times the other
    batch_size: int  # global batch of the training steps (figures 1, 2, 4, 5)
    distill_batch_size: int  # batch of figure 3's eight methods, smaller to fit the time budget
    warmup: int  # untimed rounds before the timed ones
    repeats: int  # timed rounds; each figure reports their median
    steps_per_call: int  # training steps per timed call of our loop and of the bare loop (fewer where the data has fewer)
    pipeline_batches: int  # batches timed through the usual torch DataLoader pipeline
    memory_steps: int  # training steps run for each peak-memory reading
    measure_compile: bool  # torch.compile warms up for about 40 s on 2 cores

    @property
    def label(self) -> str:
        return "fp32" if self.precision == "no" else self.precision

    def time(self, fns, warmup=None, repeats=None):
        """time_steps with this run's rounds, synchronising the device around each call."""
        return time_steps(fns, self.warmup if warmup is None else warmup, self.repeats if repeats is None else repeats, self.device_type)


def _batches(data: CifarData, n_images: int, batch_size: int, device_type: str):
    """Normalized batches of the first training images on the device, without augmentation."""
    loader = DeviceLoader(data.train.head(n_images), batch_size, torch.device(device_type), data.mean, data.std, train=False)
    return [(images, labels) for images, labels, _ in loader]


def train_loop(data: CifarData, s: Settings) -> List[Row]:
    """Figure 1: our loop (accelerate, DeviceLoader with augmentation, Supervised method,
    train_one_epoch) against the bare loop on pre-made batches, both at the policy's precision."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=s.precision, cpu=s.device_type == "cpu")
    steps = max(1, min(s.steps_per_call, len(data.train) // s.batch_size))  # the same steps on both sides, in each timed call
    n_images = s.batch_size * steps
    split = data.train.head(n_images)
    rows = []
    for name in (STUDENT, TEACHER):
        model = create_model(name, data.num_classes, device_type=s.device_type)
        baseline = bare_step(copy.deepcopy(model), _batches(data, n_images, s.batch_size, s.device_type), s.precision)
        cfg = TrainConfig(model=name, batch_size=s.batch_size, epochs=1, lr=0.05)
        method = Supervised(model)
        method, optimizer = accelerator.prepare(method, make_optimizer(method, cfg))
        loader = DeviceLoader(split, s.batch_size, accelerator.device, data.mean, data.std, train=True)
        state = TrainerState()
        ours = lambda: train_one_epoch(accelerator, method, optimizer, loader, cfg, state, 10**6, 0)  # noqa: E731
        loader_only = lambda: [None for _ in loader]  # noqa: E731  the augmentation share of ours
        times = s.time({"ours": ours, "baseline": baseline, "loader": loader_only})
        rows.append(Row(f"1 train step {name}, img/s (our loop vs bare loop)", n_images / times["ours"], n_images / times["baseline"],
                        "img/s", ">= 0.95", note=f"{steps} step{'s' if steps > 1 else ''} per timed call on each side (ours: one train_one_epoch); "
                                                 "ours includes batched crop+flip+normalize; the bare loop has no augmentation"))
        rows.append(Row(f"1 {name}: crop+flip+normalize ms/batch vs our step", 1e3 * times["loader"] / steps,
                        1e3 * times["ours"] / steps, "ms", note="ratio: share of our step spent making the batch"))
    return rows


def _usual_pipeline(dataset: str, data: CifarData, batch_size: int, batches: int, device_type: str) -> float:
    """img/s of `datasets` + torchvision per-sample transforms + DataLoader(num_workers=2),
    each batch copied to the device, after the workers have started (their first batches are
    not timed)."""
    import datasets
    from torchvision import transforms as T

    train = datasets.load_dataset(dataset)["train"]
    column = next(c for c in IMAGE_COLUMNS if c in train.features)
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(data.mean, data.std)])
    def per_sample(batch):  # the usual set_transform: PIL decode and torchvision transforms, image by image
        return {"pixel_values": [augment(image.convert("RGB")) for image in batch[column]], "label": batch["label"]}

    loader = torch.utils.data.DataLoader(train.with_transform(per_sample), batch_size=batch_size, num_workers=2, shuffle=True, drop_last=True)
    iterator = iter(loader)
    for _ in range(2):  # worker start-up and first decodes
        next(iterator)
    batches = min(batches, len(loader) - 2)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)["pixel_values"].to(device_type)
    devices.synchronize(torch.device(device_type))
    elapsed = time.perf_counter() - start
    del iterator  # stops the workers
    return batches * batch_size / elapsed


def input_pipeline(data: CifarData, s: Settings) -> List[Row]:
    """Figure 2: DeviceLoader over the whole training split vs the usual per-sample pipeline."""
    loader = DeviceLoader(data.train, s.batch_size, torch.device(s.device_type), data.mean, data.std, train=True)
    ours = len(loader) * s.batch_size / s.time(lambda: [None for _ in loader])
    usual = _usual_pipeline(s.dataset, data, s.batch_size, s.pipeline_batches, s.device_type)
    return [Row("2 input pipeline img/s (DeviceLoader vs datasets+torchvision DataLoader)", ours, usual, "img/s", ">= 8",
                note=f"ours: {s.threads} thread(s) in the training process; usual: 2 worker processes, decoding each time")]


def _method_step(method, optimizer, images, labels, index, precision: str):
    def step() -> None:
        with devices.autocast(images.device.type, precision):
            _, terms = method(images, labels, index)
        sum(terms.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def distillation(data: CifarData, s: Settings) -> List[Row]:
    """Figure 3: one training step of every method (8x4 student, 14x4 teacher) on one batch,
    against plain student training and against a student step plus a teacher forward."""
    images, labels = _batches(data, s.distill_batch_size, s.distill_batch_size, s.device_type)[0]
    index = torch.arange(len(labels), device=s.device_type)  # their dataset indices: the first training images, in order
    student = create_model(STUDENT, data.num_classes, device_type=s.device_type)
    teacher = FrozenTeacher(create_model(TEACHER, data.num_classes, seed=1, device_type=s.device_type))
    cfg = TrainConfig()
    methods = {"student": Supervised(copy.deepcopy(student))}
    methods.update({mode: build_distiller(mode, copy.deepcopy(student), teacher, DistillConfig(mode=mode), train_labels=data.train.labels)
                    for mode in DISTILLERS})
    methods = {name: m.to(s.device_type).train() for name, m in methods.items()}  # adapters, heads and banks are made on the CPU
    steps = {name: _method_step(m, make_optimizer(m, cfg), images, labels, index, s.precision) for name, m in methods.items()}
    reference_student = Supervised(copy.deepcopy(student)).train()
    student_step = _method_step(reference_student, make_optimizer(reference_student, cfg), images, labels, index, s.precision)

    def reference() -> None:  # what logits KD must cost at least: a student step and a teacher forward
        student_step()
        with torch.no_grad(), devices.autocast(s.device_type, s.precision):
            teacher.model(images)

    times = s.time({**steps, "reference": reference})
    ms = {name: 1e3 * t for name, t in times.items()}
    rows = [Row("3 logits step vs student step + teacher forward", ms["logits"], ms["reference"], "ms", "<= 1.10",
                note=f"batch {s.distill_batch_size}; student {STUDENT}, teacher {TEACHER}"),
            Row("3 hidden step (teacher stops at its tap) vs logits step", ms["hidden"], ms["logits"], "ms", "< 1")]
    rows += [Row(f"3 {mode} step vs plain student step", ms[mode], ms["student"], "ms") for mode in DISTILLERS]
    return rows


def memory(data: CifarData, s: Settings) -> List[Row]:
    """Figure 4: peak memory (RSS on CPU, allocated GPU memory on CUDA) of a few training steps,
    each in a fresh process. Distillation modes are compared on the training phase alone; the
    teacher's figure includes loading the data."""
    timeout = 120  # a few steps take seconds; this only guards against a hung child
    job = dict(threads=s.threads, dataset=s.dataset, batch_size=s.batch_size, steps=s.memory_steps,
               num_images=len(data.train), num_classes=data.num_classes, device_type=s.device_type, precision=s.precision)
    what = memory_name(s.device_type)
    results = {kind: run_isolated("memory", timeout, kind=kind, **job) for kind in ("bare", "student", *DISTILLERS, "teacher")}

    def peak(kind: str, key: str):
        result = results[kind]
        if "error" in result:
            return f"failed: {result['error']}"
        return result.get(key) or result["peak_mb"]  # no training-phase reading where the peak cannot be reset

    student_train = peak("student", "train_peak_mb")
    rows = [Row(f"4 peak {what} {STUDENT} training: our loop+data vs bare loop", student_train, peak("bare", "peak_mb"), "MiB",
                note="ours holds a uint8 split of the training split's size; bare has no data")]
    rows += [Row(f"4 peak {what} {mode} vs plain student training", peak(mode, "train_peak_mb"), student_train, "MiB") for mode in DISTILLERS]
    teacher = results["teacher"]
    phases = (f"loading peak (RSS: the data is decoded on the host) {teacher.get('load_peak_rss_mb', 0):.0f} MiB, "
              f"training peak {teacher.get('train_peak_mb') or 0:.0f} MiB, {teacher.get('num_train', 0)} images")
    if s.device_type == "cpu":
        rows.append(Row(f"4 peak {what} {TEACHER} on the full train split vs 4 GiB", peak("teacher", "peak_mb"), MEMORY_LIMIT_MB, "MiB", "< 1",
                        note=phases))
    else:  # the 4 GiB target is a CPU machine's RAM; a GPU's memory is only compared with what the GPU has
        rows.append(Row(f"4 peak {what} {TEACHER} on the full train split vs the GPU's memory", peak("teacher", "peak_mb"),
                        teacher.get("device_total_mb", "-"), "MiB", note=phases))
    return rows


def speed_options(s: Settings, seconds_left: float) -> List[Row]:
    """Figure 5: channels_last, bf16 against fp32, glibc's allocator and torch.compile, each
    against the default bare step (the policy's precision, NCHW, eager). torch.compile gets
    what is left of the time budget."""
    start = time.perf_counter()
    rows = [*_layout_and_precision(s)]
    if s.device_type == "cpu":  # glibc's allocator is the CPU's; CUDA memory has torch's own caching allocator
        rows.append(_allocator(s))
    return rows + [_compiled(s, seconds_left - (time.perf_counter() - start))]


def _layout_and_precision(s: Settings) -> List[Row]:
    """channels_last against NCHW at the policy's precision, and bf16 against fp32 side by side.
    The precision row's target is the policy's own claim: where it picks bf16, bf16 must be the
    faster; where it picks fp32 (bf16 emulated), fp32 must be."""
    batch = [random_batch(s.batch_size, device_type=s.device_type)]
    model = create_model(STUDENT, device_type=s.device_type)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    batch_cl = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batch]
    variants = {"default": bare_step(model, batch, s.precision), "channels_last": bare_step(channels_last, batch_cl, s.precision),
                "bf16": bare_step(copy.deepcopy(channels_last), batch_cl, "bf16"), "fp32": bare_step(copy.deepcopy(channels_last), batch_cl, "no")}
    per_s = {name: s.batch_size / t for name, t in s.time(variants).items()}
    policy_claim = "> 1" if s.precision == "bf16" else "< 1" if s.precision == "no" else "-"
    return [Row(f"5 {STUDENT} channels_last vs default ({s.label}), img/s", per_s["channels_last"], per_s["default"], "img/s"),
            Row(f"5 {STUDENT} bf16 autocast vs fp32 (channels_last; policy picks {s.label}), img/s", per_s["bf16"], per_s["fp32"],
                "img/s", policy_claim, note="the target is the policy's claim about this device")]


def _allocator(s: Settings) -> Row:
    """glibc keeping freed memory (timing.keep_freed_memory) vs its defaults: two fresh
    children, their steps interleaved."""
    figure = f"5 {STUDENT} glibc malloc keeping freed memory vs default, img/s"
    children = {}
    try:
        for keep in (True, False):
            children[keep] = StepProcess(s.threads, s.batch_size, s.precision, keep_freed_memory=keep)
        times = s.time({"kept": children[True], "default": children[False]})
        peaks = {keep: child.close()["peak_mb"] for keep, child in children.items()}
    except (RuntimeError, TimeoutError, EOFError, OSError) as error:
        for child in children.values():
            child.process.terminate()  # the children started above, by their pids
        return Row(figure, f"failed: {error}", "-", "img/s")
    return Row(figure, s.batch_size / times["kept"], s.batch_size / times["default"], "img/s",
               note=f"two fresh processes, steps interleaved; peak RSS {peaks[True]:.0f} vs {peaks[False]:.0f} MiB")


def _compiled(s: Settings, seconds_left: float) -> Row:
    figure = f"5 {STUDENT} torch.compile vs eager ({s.label}), img/s"
    if not s.measure_compile:
        return Row(figure, "skipped: --quick", "-", "img/s")
    if seconds_left < 60:
        return Row(figure, f"skipped: {max(seconds_left, 0):.0f} s left of the time budget", "-", "img/s")
    result = run_isolated("compile", seconds_left, threads=s.threads, batch_size=s.batch_size, warmup=s.warmup, repeats=s.repeats,
                          device_type=s.device_type, precision=s.precision)
    if "error" in result:
        return Row(figure, f"failed: {result['error']}", "-", "img/s")
    return Row(figure, s.batch_size / result["compiled"], s.batch_size / result["eager"], "img/s",
               note=f"fresh process; after a compile warm-up of {result['compile_warmup_s']:.0f} s")
