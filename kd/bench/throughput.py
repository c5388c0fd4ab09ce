"""python -m kd.bench.throughput --output FILE.json [--batch-size 512] [--steps 100] [--seconds 50]

Training throughput of the report's pair, one bare step at a time (autocast at --precision,
cross-entropy, backward, SGD; random batches already on the device): the student, the teacher,
and a logits distillation step (the student's step plus the teacher's forward). For each: img/s,
the FLOP rate it reached (FLOPs counted by kd.bench.budget), and its peak memory (allocated GPU
memory on CUDA, process RSS on CPU). The whole run stays within --seconds: each workload gets
its share of what is left, and one that runs out of it is marked "cut" with the steps it timed.
The JSON file is rewritten after each workload, so that a run killed later keeps them."""

import argparse
import sys
import time
from pathlib import Path

import torch

from kd.train import device as devices
from kd.bench.budget import count_flops
from kd.bench.timing import STUDENT, TEACHER, bare_step, create_model, memory_name, peak_memory_mb, random_batch, reset_peak_memory
from kd.config import DistillConfig, TrainConfig
from kd.distillers import FrozenTeacher, build_distiller
from kd.train.engine import make_optimizer
from kd.errors import main_guard
from kd.util.files import write_json_atomic

SYNC_EVERY = 10  # steps queued between reads of the clock (each read waits for the device)


def distill_step(batch, device_type: str, precision: str):
    """One logits-distillation training step, as kd's distiller runs it: student forward and
    backward, the frozen teacher's forward."""
    images, labels = batch
    teacher = FrozenTeacher(create_model(TEACHER, seed=1, device_type=device_type))
    method = build_distiller("logits", create_model(STUDENT), teacher, DistillConfig(mode="logits"), train_labels=labels.cpu())
    method = method.to(device_type).train()
    optimizer = make_optimizer(method, TrainConfig())
    index = torch.arange(len(labels), device=device_type)

    def step() -> None:
        with devices.autocast(device_type, precision):
            _, terms = method(images, labels, index)
        sum(terms.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(step, warmup: int, steps: int, seconds: float, device_type: str) -> dict:
    """Warm-up steps (at most half of `seconds`), then timed steps until `steps` or `seconds`
    run out (at least one)."""
    device = torch.device(device_type)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
        devices.synchronize(device)
        if time.perf_counter() - start > seconds / 2:
            break
    deadline = start + seconds
    timed, timed_start = 0, time.perf_counter()
    while timed < steps:
        step()
        timed += 1
        if timed % SYNC_EVERY == 0 or time.perf_counter() > deadline:
            devices.synchronize(device)
            if time.perf_counter() > deadline:
                break
    devices.synchronize(device)
    return {"steps": timed, "planned_steps": steps, "seconds": time.perf_counter() - timed_start, "cut": timed < steps}


def workloads(batch, device_type: str, precision: str):
    """name -> (FLOPs per image of one training step, a function that builds the step)."""
    student, teacher = count_flops(STUDENT), count_flops(TEACHER)
    return {
        STUDENT: (student.train, lambda: bare_step(create_model(STUDENT, device_type=device_type), [batch], precision)),
        TEACHER: (teacher.train, lambda: bare_step(create_model(TEACHER, device_type=device_type), [batch], precision)),
        "distill-logits": (student.train + teacher.forward, lambda: distill_step(batch, device_type, precision)),
    }


@main_guard
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.bench.throughput", description=__doc__.split("\n\n")[1])
    parser.add_argument("--output", required=True, help="JSON file of the results")
    parser.add_argument("--batch-size", type=int, default=512, help="images per step (default: 512, the GPU presets' batch)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning; default: 10)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps of each workload at most (default: 100)")
    parser.add_argument("--seconds", type=float, default=50, help="the whole run's time limit (default: 50)")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="bf16", help="autocast precision (default: bf16)")
    parser.add_argument("--cpu", action="store_true", help="measure the CPU even where there is a GPU")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.seconds
    hardware = devices.detect_hardware(use_cpu=args.cpu or None)
    device_type = hardware.type
    devices.tune_for(torch.device(device_type))
    batch = random_batch(args.batch_size, device_type=device_type)
    results = {"device": device_type, "device_name": hardware.name, "precision": args.precision, "batch_size": args.batch_size,
               "memory": memory_name(device_type), "workloads": {}}
    jobs = workloads(batch, device_type, args.precision)
    for position, (name, (flops_per_image, build)) in enumerate(jobs.items()):
        share = (deadline - time.perf_counter()) / (len(jobs) - position)
        reset_peak_memory(device_type)
        step = build()
        result = measure(step, args.warmup, args.steps, share, device_type)
        del step  # its model, optimizer and gradients, before the next workload's peak is read
        images = result["steps"] * args.batch_size
        result.update(images_per_s=images / result["seconds"], tflops=images * flops_per_image / result["seconds"] / 1e12,
                      flops_per_image=flops_per_image, peak_memory_mb=peak_memory_mb(device_type))
        results["workloads"][name] = result
        write_json_atomic(Path(args.output), results)
        print(f"{name}: {result['images_per_s']:,.0f} img/s, {result['tflops']:.1f} TFLOP/s, {result['steps']} steps of {args.batch_size}"
              f"{' (cut: out of time)' if result['cut'] else ''}, peak {results['memory']} {result['peak_memory_mb']:,.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
