"""Distil a student from a frozen teacher: `accelerate launch distill.py --mode logits` (see --help)."""

from kd.cli import distill_main

if __name__ == "__main__":
    distill_main()
