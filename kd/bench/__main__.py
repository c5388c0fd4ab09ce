"""python -m kd.bench [--dataset PATH] [--threads N] [--quick] [--output FILE.json]

Prints one table (figure | ours | baseline | ratio | target) under a line naming the machine,
the device (CUDA when there is one, else the CPU; --cpu forces the CPU) and the precision the
policy picks there (kd.train.device; --mixed-precision overrides it), which every figure uses;
figure 5 also times bf16 against fp32. --output also writes the rows, settings and machine as JSON. About 3 minutes on 2 CPU cores
(never more than 5: torch.compile gets what is left of the budget, or is skipped);
--quick (small batches, one timed round, no torch.compile) about 30 s, as a smoke test.
--budget SECONDS lowers the 5 minutes (scripts/gpu_check.py --quick gives it what its plan allows)."""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List

import torch

from kd.train import device as devices
from kd.bench import figures
from kd.bench.timing import Row, machine
from kd.data import default_dataset, load_cifar
from kd.errors import main_guard
from kd.util.files import write_json_atomic

COLUMNS = ("figure", "ours", "baseline", "ratio", "target")
BUDGET_S = 280  # the whole run stays under 5 minutes: torch.compile gets what is left of this (--budget)


# training steps per timed call of our loop and of the bare loop: a CPU step takes about a
# second; a GPU step a few ms, next to which the syncs that end each call of our loop (an
# epoch's loss means and non-finite check) would weigh as no real epoch has them weigh
STEPS_PER_CALL = {"cpu": 1, "cuda": 50}


def settings(args, device_type: str, precision: str) -> figures.Settings:
    steps = STEPS_PER_CALL[device_type]
    if args.quick:
        return figures.Settings(args.dataset, args.threads, device_type, precision, batch_size=32, distill_batch_size=32, warmup=1, repeats=1,
                                steps_per_call=steps, pipeline_batches=4, memory_steps=1, measure_compile=False)
    return figures.Settings(args.dataset, args.threads, device_type, precision, batch_size=256, distill_batch_size=128, warmup=1, repeats=4,
                            steps_per_call=steps, pipeline_batches=40, memory_steps=1, measure_compile=True)


def _cell(value, unit: str = "") -> str:
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return "nan"
    if not unit:  # a ratio: three decimals, or two significant digits below 0.001 (never a bare 0.000)
        return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2g}"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.1f} {unit}"


def render(rows: List[Row], header: str) -> str:
    def target(row: Row) -> str:
        return row.target if row.met is None else f"{row.target} {'ok' if row.met else 'MISSED'}"

    def ratio(row: Row) -> str:
        return "-" if isinstance(row.ratio, str) else _cell(row.ratio)  # a failure's reason is in "ours"

    cells = [COLUMNS] + [(r.figure, _cell(r.ours, r.unit), _cell(r.baseline, r.unit), ratio(r), target(r)) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join([header, *lines])


@main_guard
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--dataset", default=default_dataset(), help="Hub id or local folder (default: $KD_DATASET or uoft-cs/cifar10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every timed process (default: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: small batches, one timed round, no torch.compile")
    parser.add_argument("--output", help="also write the results to this JSON file")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run; torch.compile gets what is left of them, "
                                                                       f"or is skipped under 60 (default: {BUDGET_S})")
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU even where there is a GPU")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="instead of the policy's choice for the device")
    args = parser.parse_args(argv)
    hardware = devices.detect_hardware(use_cpu=args.cpu or None)
    devices.tune_for(torch.device(hardware.type))  # the runner's settings (cuDNN autotuning, TF32; glibc's allocator)
    torch.set_num_threads(args.threads)
    precision = devices.choose_precision(args.mixed_precision, hardware, warn=lambda m: print(m, file=sys.stderr), launcher_argv=None)
    s = settings(args, hardware.type, precision.mode)
    start = time.perf_counter()
    data = load_cifar(s.dataset, val_size=0)
    rows, seconds = [], {}
    for name, figure in (("train_loop", lambda: figures.train_loop(data, s)), ("input_pipeline", lambda: figures.input_pipeline(data, s)),
                         ("distillation", lambda: figures.distillation(data, s)), ("memory", lambda: figures.memory(data, s)),
                         ("speed_options", lambda: figures.speed_options(s, args.budget - (time.perf_counter() - start)))):
        figure_start = time.perf_counter()
        rows += figure()
        seconds[name] = round(time.perf_counter() - figure_start, 1)
        print(f"[kd.bench] {name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    info = {**machine(args.threads, hardware), "precision": precision.mode, "precision_reason": precision.reason}
    elapsed = time.perf_counter() - start
    device_name = "" if hardware.type == "cpu" else f" {hardware.name}"
    header = (f"machine: {info['cpu']} | torch threads {info['threads']} | torch {info['torch']} | device {info['device']}{device_name} | "
              f"precision {precision.label} ({precision.reason}) unless noted | batch {s.batch_size} | "
              f"{'quick' if args.quick else 'full'} run, {elapsed:.0f} s")
    print(render(rows, header))
    if args.output:
        write_json_atomic(Path(args.output), {"machine": info, "settings": vars(s), "elapsed_s": round(elapsed, 1),
                                              "figure_seconds": seconds, "rows": [r.to_dict() for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
