"""A method's search space and grid, declared on its class (`search_space`, `search_grid` in
kd/distillers/): checked, typed, queued and drawn for kd.tune, and read by the leaderboard's plan.

A space maps a config field to (float|int, low, high[, options]) or (categorical, choices); a
grid maps a field to the values to try, each inside the space."""

from typing import Dict, List, Optional, Sequence

from kd.config import DistillConfig, TrainConfig
from kd.distillers import DISTILLERS, Supervised
from kd.errors import UsageError

SUPERVISED = "supervised"  # the student baseline: train_student.py
KINDS = ("float", "int", "categorical")


def methods() -> Dict[str, type]:
    return {SUPERVISED: Supervised, **DISTILLERS}


def search_space(method: str, only: Optional[Sequence[str]] = None, flag: str = "--params") -> Dict[str, tuple]:
    """The method's declared space (restricted to `only`, the names `flag` gave), checked: each
    name a config field, each entry (kind, ...) well formed."""
    known = methods()
    if method not in known:
        raise UsageError(f"unknown method {method!r}; choose from {', '.join(known)}")
    space = dict(known[method].search_space)
    if only:
        unknown = sorted(set(only) - set(space))
        if unknown:
            raise UsageError(f"{flag} {unknown[0]!r} is not in the search space of {method} ({', '.join(space) or 'empty'})")
        space = {name: space[name] for name in only}
    if not space:
        raise UsageError(f"the search space of {method} is empty: declare search_space on its class in kd/distillers/")
    fields = {f.name for cls in (TrainConfig, DistillConfig) for f in cls.__dataclass_fields__.values()}
    for name, spec in space.items():
        if name not in fields or not spec or spec[0] not in KINDS:
            raise UsageError(f"{method}.search_space[{name!r}] = {spec!r}: want a config field and (float|int, low, high[, options]) or (categorical, choices)")
    return space


def parse_grid(method: str, specs: Sequence[str]) -> Dict[str, list]:
    """`--grid NAME=V1,V2 ...` -> {name: [values]}, each value typed by the declared space and inside it."""
    texts = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        if not values or name in texts:
            raise UsageError(f"--grid wants NAME=V1,V2,... once per name (e.g. dkd_beta=1,2,4), got {spec!r}")
        texts[name] = values.split(",")
    declared = search_space(method, list(texts), flag="--grid")
    return {name: [grid_value(method, name, *declared[name], text=text) for text in values] for name, values in texts.items()}


def grid_specs(grid: Dict[str, list]) -> List[str]:
    """A grid as `--grid` arguments: NAME=V1,V2,..."""
    return [f"{name}={','.join(str(value) for value in values)}" for name, values in grid.items()]


def declared_grid(method: str) -> Dict[str, list]:
    """The method's `search_grid`, typed and checked like a user's --grid; {} when it declares none."""
    declared = methods()[method].search_grid
    try:
        return parse_grid(method, grid_specs(declared)) if declared else {}
    except UsageError as error:  # the user typed no --grid: name the declaration
        raise UsageError(f"{method}.search_grid (kd/distillers/): {error}") from None


def grid_value(method: str, name: str, kind: str, *args, text: str):
    """One grid value, typed by its declared (kind, *args) and inside its range or choices."""
    if kind == "categorical":
        by_text = {str(choice): choice for choice in args[0]}
        if text not in by_text:
            raise UsageError(f"--grid {name}={text} is not among the choices of {method}: {', '.join(by_text)}")
        return by_text[text]
    try:
        value = (float if kind == "float" else int)(text)
    except ValueError:
        raise UsageError(f"--grid {name}={text}: want a number ({kind})") from None
    low, high = args[0], args[1]
    if not low <= value <= high:
        raise UsageError(f"--grid {name}={text} is outside the declared space of {method} ({low} to {high})")
    return value


def grid_points(grid: Dict[str, list]) -> List[Dict]:
    import itertools

    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def held_points(study) -> List[Dict]:
    """The points trials hold already: finished, queued to run, or running (another worker's; an
    interrupted trial, marked failed, holds none)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.WAITING,
              optuna.trial.TrialState.RUNNING)
    # a queued trial has no params until it runs: its point is in the system attribute enqueue_trial sets
    return [trial.system_attrs.get("fixed_params", trial.params) if trial.state == optuna.trial.TrialState.WAITING else trial.params
            for trial in study.get_trials(deepcopy=False, states=states)]


def enqueue_grid(study, grid: Dict[str, list]) -> None:
    """Queue each grid point no finished or queued trial holds yet, in order; an interrupted
    trial (marked failed) is queued again."""
    held = held_points(study)
    for point in grid_points(grid):
        if point not in held:
            study.enqueue_trial(point)


def distribution(kind: str, *args):
    """The Optuna distribution `suggest` draws a declared (kind, *args) from."""
    import optuna

    if kind == "categorical":
        return optuna.distributions.CategoricalDistribution(list(args[0]))
    low, high, *options = args
    make = optuna.distributions.FloatDistribution if kind == "float" else optuna.distributions.IntDistribution
    return make(low, high, **(options[0] if options else {}))


def inside(kind: str, *args, value) -> bool:
    return value in args[0] if kind == "categorical" else args[0] <= value <= args[1]


def suggest(trial, space: Dict[str, tuple]) -> Dict:
    values = {}
    for name, (kind, *args) in space.items():
        if kind == "categorical":
            values[name] = trial.suggest_categorical(name, list(args[0]))
        else:
            low, high, *options = args
            suggest_number = trial.suggest_float if kind == "float" else trial.suggest_int
            values[name] = suggest_number(name, low, high, **(options[0] if options else {}))
    return values


def to_flags(values: Dict) -> List[str]:
    return [token for name, value in values.items() for token in ("--" + name.replace("_", "-"), str(value))]
