"""Configuration flows one way: dataclass defaults <- optional YAML (--config) <- command line.

Hyperparameters (`TrainConfig`, `DistillConfig`) are kept apart from infrastructure flags
(`RunArgs`: data location, output folder, precision, tracking). The resolved config is
written into the run folder and never changed during a run."""

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from kd.data import default_dataset
from kd.errors import UsageError


def _opt(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class TrainConfig:
    model: str = _opt("cifar_resnet8x4", "timm model name (see timm.list_models('cifar_*'))")
    epochs: int = _opt(30, "training epochs")
    batch_size: int = _opt(512, "global batch: the same whatever the number of processes")
    lr: float = _opt(0.2, "peak learning rate for --batch-size (scale it with the global batch)")
    momentum: float = _opt(0.9, "SGD Nesterov momentum")
    weight_decay: float = _opt(5e-4, "L2 weight decay on conv/linear weights (not on BN or biases)")
    warmup_epochs: float = _opt(1.0, "linear warm-up from 0 before the cosine decay, in epochs")
    lr_milestones: Tuple[float, ...] = _opt((), "epochs after which the lr is multiplied by --lr-decay: step decay after the "
                                            "warm-up (the CRD/DKD papers' 150 180 210); none: cosine decay to 0", nargs="*", type=float)
    lr_decay: float = _opt(0.1, "factor of each --lr-milestones step")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy term")
    grad_accum: int = _opt(1, "gradient accumulation steps (the global batch stays --batch-size)")
    seed: int = _opt(0, "seed for weights, data order and augmentation")
    val_size: int = _opt(5000, "images held out of train (stratified, fixed split) to pick the kept weights; 0: keep the last epoch")
    max_train_samples: Optional[int] = _opt(None, "use only this many training images (quick runs)")
    max_eval_samples: Optional[int] = _opt(None, "use only this many validation and test images (quick runs)")
    image_size: Optional[int] = _opt(None, "resize every image to N x N when decoding (shorter side to N, centre crop); "
                                     "needed where a split's images differ in size (default: the dataset's own size)", type=int)
    crop_padding: Optional[int] = _opt(None, "zero padding of the random crop, in pixels; 0: flips only "
                                       "(default: 4 up to 32x32 images, an eighth of the side above)", type=int)


@dataclass(frozen=True)
class DistillConfig:
    mode: str = _opt("logits", "distillation method", choices=None)
    temperature: float = _opt(4.0, "softens both distributions in the logits term; KL is scaled by T**2")
    alpha: float = _opt(0.9, "weight of the KD term: loss = (1-alpha)*CE + alpha*T^2*KL (alpha weighs the teacher)")
    student_layer: str = _opt("layer2", "student tap for feature modes (distill.py --list-layers)")
    teacher_layer: str = _opt("layer2", "teacher tap for feature modes")
    hidden_factor: float = _opt(1.0, "weight of the feature (MSE) term")
    logits_factor: float = _opt(1.0, "weight of the logits term in hybrid mode")
    at_beta: float = _opt(1000.0, "weight of the attention-transfer term (Zagoruyko & Komodakis use 1000)")
    dkd_alpha: float = _opt(1.0, "dkd: weight of the target-class term TCKD (Zhao et al., CIFAR: 1)")
    dkd_beta: Optional[float] = _opt(None, "dkd: weight of the non-target-class term NCKD (default: the authors' value for the pair: "
                                     "2 for thin CIFAR ResNets, as their resnet56/110 -> resnet20/32; else 8, as resnet32x4 -> resnet8x4)", type=float)
    kd_warmup_epochs: Optional[float] = _opt(None, "dkd: epochs over which the KD weight rises linearly from 0 (default: --epochs/12, the paper's 20 of 240)", type=float)
    dist_beta: float = _opt(2.0, "dist: weight of the inter-class (per-sample) relation term (Huang et al., CIFAR: 2)")
    dist_gamma: float = _opt(2.0, "dist: weight of the intra-class (per-class, over the batch) relation term (Huang et al., CIFAR: 2)")
    logit_standardization: bool = _opt(False, "z-score each sample's logits before the temperature softmax (Sun et al. 2024); logits, dkd, dist")
    ls_temperature: float = _opt(2.0, "temperature used instead of --temperature with --logit-standardization (the paper's CIFAR base temperature)")
    ls_ce_weight: float = _opt(0.1, "logits with --logit-standardization: CE weight (the paper's CIFAR KD recipe; replaces 1-alpha)")
    ls_kd_weight: float = _opt(9.0, "with --logit-standardization: logits' KD weight (replaces alpha); dkd's alpha and beta are multiplied by it (the authors' --kd-weight)")
    crd_negatives: Optional[int] = _opt(None, "crd: negatives per image, drawn from the training set (default: min(16384, training images), the paper's K)", type=int)
    crd_weight: float = _opt(0.8, "crd: weight of the contrastive term (Tian et al.: 0.8)")


@dataclass(frozen=True)
class RunArgs:
    dataset: str = _opt(None, "Hub id or local folder readable by datasets.load_dataset (default: $KD_DATASET or uoft-cs/cifar10)")
    image_column: Optional[str] = _opt(None, "the dataset's image column (default: its only Image column)")
    label_column: Optional[str] = _opt(None, "the dataset's label column: ClassLabel, integers or strings (default: its only ClassLabel column)")
    test_split: Optional[str] = _opt(None, "the split read for the final evaluation (default: the first of test, validation, valid)")
    output_dir: str = _opt("outputs/run", "run folder")
    resume: bool = _opt(False, "continue from the run folder's last saved state")
    overwrite: bool = _opt(False, "replace a run folder that already holds a run")
    mixed_precision: Optional[str] = _opt(None, "no (fp32)|bf16|fp16 (default: what accelerate launch was given, else the device's native reduced precision: bf16 on Ampere+ GPUs and CPUs with AVX512-BF16/AMX, fp16 on Volta/Turing, else fp32)", choices=("no", "bf16", "fp16"))
    channels_last: bool = _opt(True, "channels_last memory format (1.4x faster on the benchmark's CPU; --no-channels-last to turn off)")
    sync_bn: bool = _opt(False, "SyncBatchNorm across processes (CUDA only; elsewhere BatchNorm stays per process)")
    compile: bool = _opt(False, "torch.compile the model")
    report_to: str = _opt("wandb", "experiment tracker", choices=("wandb", "tensorboard", "all", "none"))
    project: str = _opt("kd", "tracker project")
    run_name: Optional[str] = _opt(None, "tracker run name (default: the output folder's name)")
    tags: Tuple[str, ...] = _opt((), "tracker tags", nargs="*")
    push_to_hub: Optional[str] = _opt(None, "after training, push the model to this Hub repo id")
    hub_private: bool = _opt(False, "create the Hub repo as private")
    teacher: str = _opt("outputs/teacher", "teacher: run folder, exported model folder or hf-hub:ORG/NAME")
    list_layers: bool = _opt(False, "print the student's and teacher's layer names and shapes, then exit")
    test_eval: bool = _opt(True, "read the test split once, at the end (--no-test-eval: no test metrics, confusion matrix "
                                 "or model card; kd.tune's trials, which select on validation only)")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage block)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _add_fields(group, cls, defaults: dict, skip=()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        meta = dict(f.metadata)
        help_text = meta.pop("help") + (f" (default: {default})" if not (default is None or default is False or default == ()) else "")
        if f.type is bool or isinstance(f.default, bool):
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            group.add_argument(flag, action=action, default=default, help=help_text)
            continue
        kind = meta.pop("type", None) or {int: int, float: float}.get(type(f.default) if f.default is not None else None, None)
        if f.name in ("max_train_samples", "max_eval_samples"):
            kind = int
        group.add_argument(flag, type=kind or str, default=default, help=help_text, **{k: v for k, v in meta.items() if v is not None})


def build_parser(prog: str, description: str, defaults: dict, distill_modes: Optional[List[str]] = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file of option: value pairs; the command line overrides it")
    _add_fields(parser.add_argument_group("hyperparameters"), TrainConfig, defaults)
    if distill_modes:
        group = parser.add_argument_group("distillation")
        _add_fields(group, DistillConfig, defaults)
        group._group_actions[0].choices = distill_modes
    teacher_flags = () if distill_modes else ("teacher", "list_layers")  # distill.py's only
    _add_fields(parser.add_argument_group("run"), RunArgs, defaults, skip=teacher_flags)
    return parser


def _check_yaml_value(path: str, action: argparse.Action, value):
    """A YAML value as the command line would have parsed it: argparse never checks defaults
    against `choices` or `type`, so a preset's values are checked here."""
    key = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UsageError(f"config file {path}: {key}: {value!r} is not one of true, false")
        return value
    if action.nargs == "*":
        value = value if isinstance(value, list) else [value]
        try:  # each element as the command line parses it (--lr-milestones: floats)
            return tuple(action.type(str(v)) if action.type else str(v) for v in value)
        except ValueError:
            raise UsageError(f"config file {path}: {key}: {value!r} is not a list of {action.type.__name__} values") from None
    if value is None and action.default is None:
        return value
    if isinstance(value, bool) and action.choices and ("yes" if value else "no") in action.choices:
        value = "yes" if value else "no"  # YAML reads a bare no/yes as a boolean: `mixed_precision: no`
    if isinstance(value, (dict, list, bool)) or value is None:
        raise UsageError(f"config file {path}: {key}: {value!r} is not a single {getattr(action.type, '__name__', 'str')} value")
    try:
        value = action.type(str(value)) if action.type else str(value)
    except ValueError:
        raise UsageError(f"config file {path}: {key}: {value!r} is not a valid {action.type.__name__}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"config file {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
    except OSError as error:
        raise UsageError(f"config file {path} cannot be read ({error.strerror})") from None
    except UnicodeDecodeError as error:  # a binary file passed by mistake: say where, not how the decoder failed
        raise UsageError(f"config file {path} is not a UTF-8 text file (byte {error.start} is {raw[error.start:error.start + 1]!r}); "
                         "pass a YAML file of option: value pairs") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:  # PyYAML's message spans several lines: its problem and position in one
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"config file {path} is not valid YAML{where}: {getattr(error, 'problem', None) or str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold option: value pairs")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    checked = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            raise UsageError(f"config file {path}: unknown option {key!r}; valid options: {', '.join(actions)}")
        checked[key] = _check_yaml_value(path, actions[key], value)
    return checked


def _check_choices(parser: argparse.ArgumentParser, ns: dict) -> None:
    """The merged config against every option's choices, whatever set the value."""
    for action in parser._actions:
        if action.choices is not None and ns.get(action.dest) is not None and ns[action.dest] not in action.choices:
            raise UsageError(f"--{action.dest.replace('_', '-')}: {ns[action.dest]!r} is not one of {', '.join(map(str, action.choices))}")


def parse(parser: argparse.ArgumentParser, argv=None):
    """Returns (TrainConfig, DistillConfig or None, RunArgs)."""
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_yaml_defaults(parser, first.config))
    ns = vars(parser.parse_args(argv))
    _check_choices(parser, ns)

    def take(cls):
        return cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls) if f.name in ns})

    train = take(TrainConfig)
    distill = take(DistillConfig) if "mode" in ns else None
    run = take(RunArgs)
    if run.dataset is None:
        run = dataclasses.replace(run, dataset=default_dataset())
    check_finite(train, distill)
    validate(train, distill)
    return train, distill, run


def check_finite(train: TrainConfig, distill: Optional[DistillConfig]) -> None:
    """No setting is inf or nan: `--lr inf` passes every `> 0` check and trains to a non-finite loss."""
    for values in (train, distill):
        for f in dataclasses.fields(values) if values is not None else ():
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def with_defaults(section: str, values):
    """A saved run_config.json section ("train", "distill") with the fields it predates filled in
    with their defaults: a run written before a field existed trained as that field's default does
    (a field is only ever added with the default that keeps the old behaviour). Resume, reuse and
    the reports compare runs through this, so an older run still matches a new one."""
    cls = {"train": TrainConfig, "distill": DistillConfig}.get(section)
    if cls is None or not isinstance(values, dict):
        return values
    missing = {f.name: f.default for f in dataclasses.fields(cls)
               if f.name not in values and f.default is not dataclasses.MISSING}
    missing = {name: list(value) if isinstance(value, tuple) else value for name, value in missing.items()}  # as JSON holds it
    return {**values, **missing}


def validate(train: TrainConfig, distill: Optional[DistillConfig]) -> None:
    positive = {"--lr": train.lr, "--epochs": train.epochs, "--batch-size": train.batch_size, "--grad-accum": train.grad_accum}
    if distill:
        positive["--temperature"] = distill.temperature
    for flag, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    for flag, value in {"--max-train-samples": train.max_train_samples, "--max-eval-samples": train.max_eval_samples,
                        "--image-size": train.image_size}.items():
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    milestones = list(train.lr_milestones)
    if not (all(m > 0 for m in milestones) and milestones == sorted(set(milestones)) and 0 < train.lr_decay <= 1):
        raise UsageError(f"--lr-milestones must be increasing epochs > 0 and --lr-decay in (0, 1], got {milestones} and {train.lr_decay}")
    if train.crop_padding is not None and train.crop_padding < 0:
        raise UsageError(f"--crop-padding must be >= 0, got {train.crop_padding}")
    if train.weight_decay < 0 or train.warmup_epochs < 0 or not 0 <= train.label_smoothing < 1:
        raise UsageError("--weight-decay and --warmup-epochs must be >= 0 and --label-smoothing in [0, 1)")
    if distill and not 0 <= distill.alpha <= 1:
        raise UsageError(f"--alpha must be in [0, 1], got {distill.alpha}")
    if distill and (distill.hidden_factor < 0 or distill.logits_factor < 0):
        raise UsageError("--hidden-factor and --logits-factor must be >= 0")
    if distill:
        _validate_methods(distill)


def _validate_methods(distill: DistillConfig) -> None:
    weights = {"--dkd-alpha": distill.dkd_alpha, "--dkd-beta": distill.dkd_beta or 0, "--dist-beta": distill.dist_beta,
               "--dist-gamma": distill.dist_gamma, "--ls-ce-weight": distill.ls_ce_weight, "--ls-kd-weight": distill.ls_kd_weight,
               "--crd-weight": distill.crd_weight, "--kd-warmup-epochs": distill.kd_warmup_epochs or 0}
    for flag, value in weights.items():
        if not value >= 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if not distill.ls_temperature > 0:
        raise UsageError(f"--ls-temperature must be positive, got {distill.ls_temperature}")
