"""A run folder on the Hugging Face Hub: its model card (README.md, written from the run's own
files) and the push of the exported model with its results.

    python -m kd.hub push RUN_DIR --repo-id ORG/NAME [--private]
"""

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, Optional, Sequence

from kd.config import Parser
from kd.data import is_local_dataset
from kd.errors import RunError, UsageError, main_guard
from kd.train.export import load_model
from kd.util.files import write_text_atomic

CARD = "README.md"
NEEDED = ("config.json", "model.safetensors", "metrics.json", "run_config.json")  # what a finished run holds
PUSHED = NEEDED + (CARD, "history.jsonl", "curves.png", "confusion_matrix.png")  # never checkpoint/ (optimizer state, 3x the size) nor tracker logs
BASE_TAGS = ["image-classification", "timm", "knowledge-distillation"]


def read_run(run_dir: Path, metrics: Optional[Dict] = None) -> Dict:
    """run_config.json and metrics.json of a finished run (or `metrics`, of a run that writes its
    metrics.json after its card); a one-line error otherwise."""
    needed = NEEDED if metrics is None else [name for name in NEEDED if name != "metrics.json"]
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise UsageError(f"{run_dir} is not a finished run folder (no {', '.join(missing)}); "
                         "pass the --output-dir of a completed training run")
    run = {"run_config": json.loads((run_dir / "run_config.json").read_text()),
           "metrics": json.loads((run_dir / "metrics.json").read_text()) if metrics is None else metrics}
    if "test" not in run["metrics"]:
        raise UsageError(f"{run_dir} was trained with --no-test-eval (e.g. a kd.tune trial): it has no test metrics to publish; "
                         "train it again without that flag")
    return run


def hub_dataset_id(dataset: str) -> Optional[str]:
    """The Hub id of the dataset, or None for a local folder (same rule as kd.data: a path that
    exists, starts like a path or has more than one '/')."""
    return None if is_local_dataset(dataset) else dataset


def dataset_label(dataset: str) -> str:
    """How the card names the dataset: its Hub id, or a local folder's name (not its full path,
    which says nothing to a reader and may be private)."""
    return hub_dataset_id(dataset) or Path(dataset).expanduser().name


def card_metadata(run_config: Dict, metrics: Dict, model_name: str):
    from huggingface_hub import EvalResult, ModelCardData

    dataset = run_config["run"]["dataset"]
    hub_id, name = hub_dataset_id(dataset), Path(dataset).name.lower()
    split = (run_config.get("data_layout") or {}).get("test_split", "test")  # the split the test metrics are of
    common = dict(task_type="image-classification", dataset_type=hub_id or name, dataset_name=name, dataset_split=split)
    test = metrics["test"]
    results = [EvalResult(metric_type="accuracy", metric_value=round(test["accuracy"], 4), metric_name="Test accuracy", **common),
               EvalResult(metric_type="f1", metric_value=round(test["f1_macro"], 4), metric_name="Test F1 (macro)",
                          metric_args={"average": "macro"}, **common)]
    return ModelCardData(license="apache-2.0", library_name="timm", tags=BASE_TAGS + [name], datasets=[hub_id] if hub_id else None,
                         metrics=["accuracy", "f1"], model_name=model_name, eval_results=results)


def teacher_summary(teacher: str) -> str:
    """`source` plus the teacher's architecture and test accuracy when its run folder is here."""
    folder = Path(teacher)
    try:
        architecture = json.loads((folder / "config.json").read_text())["architecture"]
        accuracy = json.loads((folder / "metrics.json").read_text())["test"]["accuracy"]
    except (OSError, ValueError, KeyError):  # a Hub teacher, or a folder moved since: the name alone
        return f"`{teacher}`"
    return f"`{teacher}` (`{architecture}`, test accuracy {accuracy:.4f})"


def describe(run_config: Dict, architecture: str, num_params: int) -> str:
    """One paragraph: what the model is and how it was trained."""
    classes = run_config["data"]["class_names"]
    dataset = dataset_label(run_config["run"]["dataset"])
    what = f"`{architecture}` ({num_params:,} parameters), an image classifier for the {len(classes)} classes of `{dataset}`"
    if run_config.get("teacher"):
        return (f"{what}, distilled from the teacher {teacher_summary(run_config['teacher'])} "
                f"with the `{run_config['distill']['mode']}` method (its settings are under Training).")
    return f"{what}, trained as a {run_config.get('role', 'model')} with cross-entropy ({run_config.get('method', 'supervised')})."


def metrics_table(metrics: Dict) -> str:
    splits = [s for s in ("test", "val") if s in metrics]
    names = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted", "f1_weighted"]
    rows = [f"| {name} | " + " | ".join(f"{metrics[s][name]:.4f}" for s in splits) + " |" for name in names]
    counts = "| images | " + " | ".join(str(metrics[s]["num_samples"]) for s in splits) + " |"
    header = "| metric | " + " | ".join({"test": "test", "val": "validation"}[s] for s in splits) + " |"
    return "\n".join([header, "|---" * (len(splits) + 1) + "|", *rows, counts])


def per_class_table(per_class: Dict) -> str:
    rows = [f"| {name.replace('|', '/')} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {s['support']} |"
            for name, s in per_class.items()]
    return "\n".join(["| class | precision | recall | F1 | support |", "|---|---|---|---|---|", *rows])


def yaml_block(data: Dict) -> str:
    import yaml

    return "```yaml\n" + yaml.safe_dump(data, sort_keys=False, width=10_000).strip() + "\n```"


def usage(repo_id: Optional[str], run_dir: Path) -> str:
    source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{run_dir}"
    return "\n".join([
        "It needs the `kd` package (the repository that trained it) for the architecture:",
        "",
        "```python",
        "import kd  # registers the cifar_* architectures with timm",
        "import timm",
        "",
        f'model = timm.create_model("{source}", pretrained=True).eval()',
        "config = timm.data.resolve_model_data_config(model)  # the input size and mean/std the weights expect (inputs in [0, 1], then normalised)",
        'labels = model.pretrained_cfg["label_names"]',
        "```",
    ])


def input_line(input_size) -> str:
    """What the weights take: the size they were trained on, as the exported config records it."""
    channels, height, width = input_size
    return (f"Trained on {width}x{height} images with {channels} channels (RGB; kd repeats a grayscale image into three): "
            f"`pretrained_cfg.input_size` is `{list(input_size)}`, and the transform built from "
            "`timm.data.resolve_model_data_config` resizes to that size.")


def card_text(run_dir: Path, repo_id: Optional[str], metrics: Optional[Dict] = None) -> str:
    run = read_run(run_dir, metrics)
    run_config, metrics = run["run_config"], run["metrics"]
    model = load_model(str(run_dir))
    architecture = model.pretrained_cfg.get("architecture") or run_config["train"]["model"]
    title = repo_id or run_dir.resolve().name
    metadata = card_metadata(run_config, metrics, title).to_yaml()
    test = metrics["test"]
    training = {"train": run_config["train"], **({"distill": run_config["distill"]} if run_config.get("distill") else {})}
    data = run_config["data"]
    sections = [
        f"---\n{metadata}\n---",
        f"# {title}",
        describe(run_config, architecture, sum(p.numel() for p in model.parameters())),
        f"**Test accuracy {test['accuracy']:.4f}**, macro F1 {test['f1_macro']:.4f} on {test['num_samples']} test images.",
        "## Results",
        f"The weights are those of epoch {metrics['kept_epoch']} of {metrics['epochs']}, selected by {metrics['selected_by']}.",
        metrics_table(metrics),
        "### Per class (test)",
        per_class_table(test["per_class"]),
        *(["![confusion matrix of the test split](confusion_matrix.png)"] if (run_dir / "confusion_matrix.png").is_file() else []),
        "## Training",
        f"{data['num_train']} training, {data['num_val']} validation and {data['num_test']} test images; "
        f"{run_config.get('num_processes', 1)} process(es), mixed precision `{run_config.get('mixed_precision')}`.",
        input_line(model.pretrained_cfg["input_size"]),
        yaml_block(training),
        "## Provenance",
        yaml_block({key: run_config.get(key) for key in ("git_commit", "versions", "command")}),
        "## How to use",
        usage(repo_id, run_dir),
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(run_dir, repo_id: Optional[str] = None, metrics: Optional[Dict] = None) -> Path:
    """Write RUN_DIR/README.md from the run's files (and `metrics`, where its metrics.json is
    still to be written). Without `repo_id` the load snippet points at the local folder;
    push_run's CLI rewrites it with the repo id before pushing."""
    run_dir = Path(run_dir)
    path = run_dir / CARD
    write_text_atomic(path, card_text(run_dir, repo_id, metrics))
    return path


def retry_command(run_dir, repo_id: str, private: bool) -> str:
    return f"python -m kd.hub push {shlex.quote(str(run_dir))} --repo-id {shlex.quote(repo_id)}" + (" --private" if private else "")


def push_run(run_dir, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Upload the exported model, its card and results to the Hub model repo `repo_id` (created
    if needed); returns the commit URL. Writes the card first only if the folder has none.
    The token comes from `token`, else HF_TOKEN or `hf auth login`."""
    import huggingface_hub

    run_dir = Path(run_dir)
    accuracy = read_run(run_dir)["metrics"]["test"]["accuracy"]
    retry = retry_command(run_dir, repo_id, private)
    token = token or huggingface_hub.get_token()
    if not token:
        raise RunError(f"no Hugging Face token to push {run_dir} to {repo_id}: run `hf auth login` or set HF_TOKEN, then: {retry}")
    if not (run_dir / CARD).exists():
        write_model_card(run_dir, repo_id)
    try:
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=run_dir, allow_patterns=list(PUSHED), repo_type="model",
                                   commit_message=f"kd run {run_dir.resolve().name}: test accuracy {accuracy:.4f}")
    except Exception as error:  # network, HTTP and auth errors come in many types; all mean "not pushed"
        reason = " ".join(str(error).split())[:200]
        raise RunError(f"push of {run_dir} to {repo_id} failed ({type(error).__name__}: {reason}); retry with: {retry}") from error
    return commit.commit_url


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m kd.hub", description="Share a finished run on the Hugging Face Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="write the model card, then upload the model, card and results")
    push.add_argument("run_dir", help="a finished run folder (train_teacher.py / distill.py --output-dir)")
    push.add_argument("--repo-id", required=True, help="Hub model repo, ORG/NAME (created if it does not exist)")
    push.add_argument("--private", action="store_true", help="create the repo as private (an existing repo keeps its visibility)")
    return parser


@main_guard
def push_command(argv: Optional[Sequence[str]] = None) -> str:
    """The command line's work; returns the commit URL."""
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} does not exist; pass the --output-dir of a finished training run")
    write_model_card(run_dir, args.repo_id)  # refreshed so that its load snippet names this repo
    url = push_run(run_dir, args.repo_id, private=args.private)
    print(f"pushed {run_dir} to {args.repo_id}: {url}")
    return url


def main(argv: Optional[Sequence[str]] = None) -> None:  # None: the console script exits with main()'s value
    push_command(argv)


if __name__ == "__main__":
    main()
