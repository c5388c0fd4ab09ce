"""Train the teacher: `accelerate launch train_teacher.py --dataset PATH` (see --help)."""

from kd.cli import train_main

if __name__ == "__main__":
    train_main("teacher")
