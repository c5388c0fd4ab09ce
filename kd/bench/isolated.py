"""Figures that need a process of their own: peak memory (so that the peaks of two modes never
mix), glibc's allocator settings (process-wide) and torch.compile (a time-bounded warm-up that
may fail or hang without taking the benchmark down). Children are forked from a forkserver that has imported this module, and
with it torch, timm, accelerate and kd: each starts like a fresh run, minus the imports' time."""

import itertools
import multiprocessing
import threading
import time
import traceback
from typing import Dict, Optional

import torch

from kd.bench.timing import (STUDENT, TEACHER, bare_step, create_model, peak_memory_mb, peak_rss_mb, random_batch,
                             reset_peak_memory, time_steps)
from kd.train import device as devices
from kd.train.device import keep_freed_memory
from kd.config import DistillConfig, TrainConfig
from kd.data import DeviceLoader, Split, load_cifar
from kd.distillers import FrozenTeacher, Supervised, build_distiller
from kd.train.engine import TrainerState, make_optimizer, train_one_epoch
from kd.models import CIFAR10_MEAN, CIFAR10_STD


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # takes effect when the server starts, once
    return context


def run_isolated(job: str, timeout_s: float, **kwargs) -> Dict:
    """Run JOBS[job](**kwargs) in a fresh child; returns its dict, or {"error": reason}."""
    receive, send = _context().Pipe(duplex=False)
    child = _context().Process(target=_entry, args=(send, job, kwargs), daemon=True)
    child.start()
    send.close()
    try:
        if receive.poll(timeout_s):
            return receive.recv()
        return {"error": f"no result within {timeout_s:.0f} s"}
    except EOFError:  # the child died without a word
        child.join(10)
        return {"error": f"child exited with code {child.exitcode} (killed for memory?)"}
    finally:
        if child.is_alive():
            child.terminate()  # the one child started above, by its pid
        child.join(10)


def _entry(send, job: str, kwargs: Dict) -> None:
    from tqdm.auto import tqdm

    # tqdm's default lock is a multiprocessing semaphore that a forked child never releases
    # (it leaves by os._exit), so the resource tracker would warn about leaks at shutdown
    tqdm.set_lock(threading.RLock())
    devices.tune_for(torch.device(kwargs["device_type"]))  # process-wide, as in a run: cuDNN autotuning and TF32, glibc's allocator
    torch.set_num_threads(kwargs.pop("threads"))
    try:
        result = JOBS[job](**kwargs)
    except Exception as error:  # reported in the table as "failed: ...", never raised
        traceback.print_exc()  # the whole story on stderr; the table gets one line
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"}
    send.send(result)
    send.close()


class FirstBatches:
    """The first `n` batches of a loader, as a loader (train_one_epoch needs len and iter)."""

    def __init__(self, loader: DeviceLoader, n: int):
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


def memory_job(kind: str, dataset: Optional[str], batch_size: int, steps: int, num_images: int, num_classes: int,
               device_type: str, precision: str) -> Dict:
    """Peak memory (RSS on CPU, allocated GPU memory on CUDA) of `steps` training steps. kind: "bare" (the bare loop on a random batch, no
    data), "teacher" (our loop, Supervised, the real training split loaded by load_cifar),
    "student" or a distillation mode (our loop, 8x4 student and 14x4 teacher, on a uint8 split
    of the real one's size, so that the load's transient peak does not hide the step's)."""
    from accelerate import Accelerator

    after_imports = peak_rss_mb()
    if kind == "bare":
        step = bare_step(create_model(STUDENT, device_type=device_type), [random_batch(batch_size, device_type=device_type)], precision)
        for _ in range(steps):
            step()
        return {"peak_mb": peak_memory_mb(device_type), "after_imports_mb": after_imports}
    if kind == "teacher":
        data = load_cifar(dataset, val_size=0)  # the whole training split, as a real run holds it
        split, mean, std, num_classes = data.train, data.mean, data.std, data.num_classes
    else:
        split = Split(torch.full((num_images, 3, 32, 32), 128, dtype=torch.uint8), torch.arange(num_images) % num_classes)
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    load_peak = peak_rss_mb()  # decoded on the host on either device: nothing is on a GPU yet
    can_reset = reset_peak_memory(device_type)
    accelerator = Accelerator(mixed_precision=precision, cpu=device_type == "cpu")
    student = create_model(TEACHER if kind == "teacher" else STUDENT, num_classes)
    if kind in ("student", "teacher"):
        method = Supervised(student)
    else:
        teacher = FrozenTeacher(create_model(TEACHER, num_classes, seed=1)).to(accelerator.device)
        method = build_distiller(kind, student, teacher, DistillConfig(mode=kind), train_labels=split.labels)
    cfg = TrainConfig(batch_size=batch_size, epochs=1)
    optimizer = make_optimizer(method, cfg)
    method, optimizer = accelerator.prepare(method, optimizer)
    loader = DeviceLoader(split, batch_size, accelerator.device, mean, std, train=True)
    train_one_epoch(accelerator, method, optimizer, FirstBatches(loader, steps), cfg, TrainerState(), 10_000, 0)
    train_peak = peak_memory_mb(device_type)
    on_gpu = {"device_total_mb": torch.cuda.get_device_properties(accelerator.device).total_memory / 2**20} if device_type == "cuda" else {}
    return {"peak_mb": max(load_peak, train_peak) if device_type == "cpu" else train_peak, "load_peak_rss_mb": load_peak,
            "train_peak_mb": train_peak if can_reset else None, "after_imports_mb": after_imports, "num_train": len(split), **on_gpu}


def compile_workers(device_type: str) -> Optional[int]:
    """inductor's compile workers: none besides the process itself on a CPU run, whose cores the
    timed steps need (a pool stalls a 2-core machine); inductor's own default on a GPU host."""
    return 1 if device_type == "cpu" else None


def compile_job(batch_size: int, warmup: int, repeats: int, device_type: str, precision: str) -> Dict:
    """torch.compile (inductor) vs eager on the bare step, after the compile warm-up."""
    import torch._inductor.config as inductor_config

    workers = compile_workers(device_type)
    if workers:
        inductor_config.compile_threads = workers
    batch = [random_batch(batch_size, device_type=device_type)]
    eager = bare_step(create_model(STUDENT, device_type=device_type), batch, precision)
    compiled = bare_step(torch.compile(create_model(STUDENT, device_type=device_type)), batch, precision)
    start = time.perf_counter()
    compiled()  # the first call compiles forward and backward
    warmup_s = time.perf_counter() - start
    times = time_steps({"compiled": compiled, "eager": eager}, warmup, repeats, device_type)
    return {**times, "compile_warmup_s": warmup_s}


class StepProcess:
    """A fresh child holding one bare training step of the student, run each time this object
    is called: two children with different process-wide settings (the allocator's) can then be
    timed round-robin by time_steps, just as two functions of one process are."""

    def __init__(self, threads: int, batch_size: int, precision: str, keep_freed_memory: bool, timeout_s: float = 120):
        self.connection, child_end = _context().Pipe()
        self.timeout_s = timeout_s
        self.process = _context().Process(target=_serve_steps, args=(child_end, threads, batch_size, precision, keep_freed_memory), daemon=True)
        self.process.start()
        child_end.close()
        self._receive()  # ready, or the child's error

    def _receive(self):
        if not self.connection.poll(self.timeout_s):
            raise TimeoutError(f"no answer within {self.timeout_s:.0f} s")
        answer = self.connection.recv()
        if isinstance(answer, dict) and "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def __call__(self) -> None:
        self.connection.send("step")
        self._receive()

    def close(self) -> Dict:
        """Stops the child; returns its peak RSS."""
        try:
            self.connection.send("stop")
            return self._receive()
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.terminate()  # the one child started above, by its pid


def _serve_steps(connection, threads: int, batch_size: int, precision: str, keep: bool) -> None:
    torch.set_num_threads(threads)
    try:
        if keep and not keep_freed_memory():
            raise RuntimeError("mallopt is not available (not glibc?)")
        step = bare_step(create_model(STUDENT), [random_batch(batch_size)], precision)
    except Exception as error:  # reported by the parent as "failed: ..."
        connection.send({"error": f"{type(error).__name__}: {error}"})
        return
    connection.send("ready")
    while connection.recv() == "step":
        step()
        connection.send("done")
    connection.send({"peak_mb": peak_rss_mb()})


JOBS = {"memory": memory_job, "compile": compile_job}
