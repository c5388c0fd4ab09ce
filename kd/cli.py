"""The command lines of train_teacher.py, train_student.py and distill.py."""

import dataclasses
from typing import Dict, Optional, Sequence

from kd.train import runner
from kd.config import build_parser, parse
from kd.distillers import DISTILLERS, FrozenTeacher, Supervised, build_distiller
from kd.errors import UsageError, main_guard
from kd.train.export import load_model
from kd.models import list_taps

ROLES = {
    "teacher": dict(model="cifar_resnet14x4", output_dir="outputs/teacher"),
    "student": dict(model="cifar_resnet8x4", output_dir="outputs/student"),
}


def train_parser(role: str):
    """train_teacher.py's or train_student.py's flags (also what kd.tune and the leaderboard driver check them with)."""
    return build_parser(f"train_{role}.py", f"Train the {role} on CIFAR-10 with cross-entropy.", ROLES[role])


@main_guard
def train(role: str, argv: Optional[Sequence[str]] = None, on_epoch: Optional[runner.EpochCallback] = None) -> Dict:
    """Train the teacher or the student baseline; returns the final metrics."""
    cfg, _, run = parse(train_parser(role), argv)
    supervised = lambda student, data, accelerator: Supervised(student, label_smoothing=cfg.label_smoothing)  # noqa: E731
    return runner.run(cfg, run, supervised, extra={"role": role, "method": "supervised"}, on_epoch=on_epoch)


def check_teacher(model, source: str, num_classes: int, image_shape) -> None:
    if model.num_classes != num_classes:
        raise UsageError(f"teacher {source} predicts {model.num_classes} classes but the dataset has {num_classes}; train a teacher on this dataset")
    teacher_input = tuple(model.pretrained_cfg.get("input_size", (3, 32, 32)))  # what its export recorded
    if teacher_input != tuple(image_shape):
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        raise UsageError(f"teacher {source} was trained on {shape(teacher_input)} images but this run's are {shape(image_shape)}; "
                         f"pass --image-size {teacher_input[-1]} or train a teacher at this size")


def print_layers(student, teacher: FrozenTeacher) -> None:
    for role, model in (("student", student), ("teacher", teacher.model)):
        print(f"{role} {model.pretrained_cfg.get('architecture')}:")
        for name, shape in list_taps(model).items():
            print(f"  {name:10s} {'x'.join(map(str, shape))}")


def distill_parser():
    """distill.py's flags (also what kd.tune and the leaderboard driver check a method's flags with)."""
    return build_parser(
        "distill.py",
        "Train a student from a frozen teacher. --alpha weighs the teacher: "
        "loss = (1-alpha)*CE + alpha*T^2*KL (some libraries use the opposite convention).",
        {**ROLES["student"], "output_dir": None},
        distill_modes=list(DISTILLERS),
    )


@main_guard
def distill(argv: Optional[Sequence[str]] = None, on_epoch: Optional[runner.EpochCallback] = None) -> Optional[Dict]:
    """Distil a student; returns the final metrics (None with --list-layers)."""
    parser = distill_parser()
    cfg, distill, run = parse(parser, argv)
    if run.output_dir is None:
        run = dataclasses.replace(run, output_dir=f"outputs/distill-{distill.mode}")
    teacher = FrozenTeacher(load_model(run.teacher, "teacher"))  # before the data: a wrong path fails fast
    distill = DISTILLERS[distill.mode].pair_defaults(distill, teacher.model.pretrained_cfg.get("architecture"), cfg.model)
    if run.list_layers:
        print_layers(runner.create_student(cfg, teacher.model.num_classes), teacher)
        return None

    def make_method(student, data, accelerator):
        check_teacher(teacher.model, run.teacher, data.num_classes, data.train.images.shape[1:])
        teacher.match_input(data.mean, data.std)  # each model sees images normalised as it was trained
        method = build_distiller(distill.mode, student, teacher, distill, cfg.label_smoothing, train_labels=data.train.labels)
        teacher.to(accelerator.device)
        return method

    teacher_info = {"teacher": run.teacher, "method": distill.mode}
    return runner.run(cfg, run, make_method, distill=distill, extra=teacher_info, on_epoch=on_epoch)


# Entry points (scripts and console scripts) return None: the installed wrapper calls
# sys.exit(entry()), which prints anything else to stderr and exits 1.
def train_main(role: str, argv: Optional[Sequence[str]] = None) -> None:
    train(role, argv)


def distill_main(argv: Optional[Sequence[str]] = None) -> None:
    distill(argv)


def teacher_entry() -> None:
    train_main("teacher")


def student_entry() -> None:
    train_main("student")
