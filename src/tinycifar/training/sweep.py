"""``tinycifar sweep FILE.toml``: a hyperparameter search over any config values, driven by Optuna.

The file names the recipe, the number of trials, fixed values and the search space; keys are
``--set`` keys (``lr``, ``aug.cutout_size``, ``model_kwargs.width``):

    preset = "fast"
    trials = 12
    objective = "final_acc"        # or best_acc; always maximized
    seed = 0                       # optional: seeds the sampler (reproducible with one worker)
    [set]                          # the same for every trial
    epochs = 4
    [params.lr]                    # a float range, searched on a log scale
    low = 0.02
    high = 0.3
    log = true
    [params.weight_decay]
    low = 1e-5
    high = 1e-3
    log = true
    [params."aug.cutout_size"]     # a choice
    choices = [0, 8, 12]

Sampling is TPE, and poor trials are pruned from their per-epoch test accuracy (median rule,
after three complete trials, in the second half of a trial's epochs). Every trial is an
ordinary run folder (``OUT/trial-0007``). The study lives in a database, SQLite in the sweep
folder by default, so a stopped sweep resumes where it was, and ``--storage postgresql://...``
lets workers on several machines share one study: start the same command on each. Results:
``results.md``/``results.csv`` and plots of the objective per trial and against each parameter.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import optuna  # the sweep extra
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from optuna.trial import TrialState

from ..checkpoint import atomic_write_bytes
from ..config import ConfigError, parse_assignments, resolve_config
from ..tomlfile import read_toml

OBJECTIVES = ("final_acc", "best_acc")


@dataclass
class Param:
    name: str  # a --set key
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        integer = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))
        if integer:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass
class SweepSpec:
    name: str
    preset: str = "fast"
    trials: int = 10
    objective: str = "final_acc"
    seed: int | None = None  # seeds the sampler: reproducible with one worker
    fixed: dict[str, Any] = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)


def load_sweep(path: str | Path) -> SweepSpec:
    """The sweep file, checked: one line naming the file and the key for anything wrong."""
    path = Path(path)
    values = read_toml(path, str(path), ConfigError)
    known = {"preset", "trials", "objective", "seed", "set", "params"}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    spec = SweepSpec(path.stem, str(values.get("preset", "fast")), values.get("trials", 10),
                     values.get("objective", "final_acc"), values.get("seed"))
    if not isinstance(spec.trials, int) or isinstance(spec.trials, bool) or spec.trials < 1:
        raise ConfigError(f"{path}: trials must be a positive integer, got {spec.trials!r}")
    if spec.objective not in OBJECTIVES:
        raise ConfigError(f"{path}: objective must be one of {', '.join(OBJECTIVES)}, got {spec.objective!r}")
    fixed = values.get("set", {})
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: [set] must be a table of config values")
    spec.fixed = parse_assignments([f"{k}={json.dumps(v)}" for k, v in _flat(fixed).items()])
    params = values.get("params", {})
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: [params] must name at least one config value to search")
    for name, p in params.items():
        spec.params.append(_param(path, name, p))
    try:  # every key and range must make a valid config: found now, not after hours of trials
        resolve_config(spec.preset, None, _overrides(spec, {p.name: p.low if p.choices is None else p.choices[0]
                                                            for p in spec.params}))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict) and k in ("aug", "model_kwargs"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _param(path: Path, name: str, p: Any) -> Param:
    where = f"{path}: [params.{name}]"
    if not isinstance(p, dict):
        raise ConfigError(f"{where} must be a table with low/high (and log, step) or choices")
    extra = set(p) - {"low", "high", "log", "step", "choices"}
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}")
    if "choices" in p:
        if not isinstance(p["choices"], list) or not p["choices"]:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        return Param(name, choices=p["choices"])
    low, high = p.get("low"), p.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not numbers or low >= high:
        raise ConfigError(f"{where}: expected numbers low < high, got low={low!r}, high={high!r}")
    if p.get("log") and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low!r}")
    return Param(name, low, high, bool(p.get("log", False)), p.get("step"))


def _overrides(spec: SweepSpec, chosen: dict[str, Any]) -> dict[str, Any]:
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.fixed.items()}
    for key, value in parse_assignments([f"{k}={json.dumps(v)}" for k, v in chosen.items()]).items():
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return values


# ---------------------------------------------------------------------------- running


def storage_for(url: str | None, out: Path):
    """Optuna's RDB storage: the URL given, else SQLite in the sweep folder (waiting on its lock)."""
    if url is None:
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental"; they mark a killed worker's trial failed
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180)
        except Exception as e:  # noqa: BLE001 - a wrong URL or an unreachable server fails in many ways
            if not _lost_the_schema_race(e) or attempt == 4:
                first = (str(e).splitlines() or [""])[0]
                raise ConfigError(f"--storage {url}: cannot open ({type(e).__name__}: {first})") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _lost_the_schema_race(e: Exception) -> bool:
    """Two workers starting together both create the schema, and the loser's CREATE fails: SQLite
    says IntegrityError or OperationalError (locked), PostgreSQL ProgrammingError (DuplicateTable,
    'relation "studies" already exists'). A second try finds the schema made. A refused connection,
    a wrong database or password is not a race."""
    name, text = type(e).__name__, str(e).lower()
    if name == "ProgrammingError":
        return "already exists" in text
    return name in ("IntegrityError", "OperationalError") and "connect" not in text


def median_pruner(spec: SweepSpec):
    """Stop a trial whose accuracy falls below the median of earlier trials at the same epoch, but
    only in the second half of its epochs: early accuracy under a one-cycle schedule says more about
    where the lr ramp is than about where the run ends."""
    epochs = resolve_config(spec.preset, None, spec.fixed).epochs
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 2))


def run_sweep(spec: SweepSpec, out: str | Path, storage: str | None = None, trials: int | None = None,
              extra: dict[str, Any] | None = None, data=None, pruner=None):
    """Run trials until the study holds ``trials`` finished ones (shared with any other workers)."""
    from .train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=spec.name, storage=storage_for(storage, out), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=4),
        pruner=pruner or median_pruner(spec))
    total = trials or spec.trials

    def objective(trial) -> float:
        chosen = {p.name: p.suggest(trial) for p in spec.params}
        run_dir = out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        # the pruner compares trials epoch by epoch, so every epoch is tested unless the spec says otherwise
        cfg = resolve_config(spec.preset, None, {"eval_every": 1, **_overrides(spec, chosen), **(extra or {}),
                                                 "out": str(run_dir), "quiet": True})

        def report(epoch: int, accuracy: float) -> None:
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {accuracy:.2f}% is below the median of earlier trials")

        result = train(cfg, data=data, on_epoch=report)
        return float(result.summary[spec.objective])

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(states=finished))
    if done < total:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(total, states=finished)],
                       catch=(RuntimeError,))
    return study


# ---------------------------------------------------------------------------- results


def results_rows(study, spec: SweepSpec) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     spec.objective: round(t.value, 4) if t.value is not None else None,
                     "epochs": last, **{p.name: t.params.get(p.name) for p in spec.params},
                     "run": t.user_attrs.get("run_dir", "")})
    return rows


def plot_study(study, spec: SweepSpec) -> Figure:
    """The objective per trial (with the best so far) and against each searched value."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    panels = 1 + len(spec.params)
    fig = Figure(figsize=(4.2 * panels, 3.8), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    numbers = [t.number for t in complete]
    values = [t.value for t in complete]
    axes[0].scatter(numbers, values, color="#2f6fde", label="complete")
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    axes[0].scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                    color="#c23b3b", marker="x", label="pruned (last epoch)")
    best, line = -math.inf, []
    for v in values:
        best = max(best, v)
        line.append(best)
    axes[0].step(numbers, line, where="post", color="#1d2433", label="best so far")
    axes[0].set(title=f"{spec.objective} per trial", xlabel="trial", ylabel="test accuracy (%)")
    axes[0].legend(fontsize=8)
    for ax, p in zip(axes[1:], spec.params, strict=True):
        xs = [t.params.get(p.name) for t in complete]
        if p.choices is not None:
            labels = [str(c) for c in p.choices]
            ax.scatter([labels.index(str(x)) for x in xs], values, color="#2f6fde")
            ax.set_xticks(range(len(labels)), labels)
        else:
            ax.scatter(xs, values, color="#2f6fde")
            if p.log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=p.name, xlabel=p.name)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def write_results(study, spec: SweepSpec, out: str | Path) -> Path:
    """results.csv, results.md and results.png in the sweep folder; returns results.md."""
    from ..reports.report import STYLE

    out = Path(out)
    rows = results_rows(study, spec)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    with matplotlib.rc_context(STYLE):
        png = io.BytesIO()
        plot_study(study, spec).savefig(png, format="png", dpi=100)
    atomic_write_bytes(out / "results.png", lambda f: f.write(png.getvalue()))
    columns = list(rows[0]) if rows else []
    lines = [f"# Sweep {spec.name}: {len(rows)} trials of the {spec.preset} preset", ""]
    try:
        best = study.best_trial
        lines += [f"Best: trial {best.number}, {spec.objective} {best.value:.2f}%, "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()),
                  ""]
    except ValueError:
        lines += ["No trial has finished yet.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                                for c in columns) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "results.md", lambda f: f.write(text.encode()))
    return out / "results.md"
