"""Train the student: `accelerate launch train_student.py --dataset PATH` (see --help)."""

from kd.cli import train_main

if __name__ == "__main__":
    train_main("student")
