"""The small public Python API, for notebooks: train, check and look at your own network.

    import tinycifar
    from my_net import Net

    print(tinycifar.check(Net()))                      # the assignment's rules, PASS/FAIL each
    print(tinycifar.summary(Net()))                    # per-layer shapes, parameters, MACs, field
    run = tinycifar.fit(Net(), preset="seed", epochs=20)
    tinycifar.plot_curves(run); tinycifar.plot_mistakes(run); tinycifar.plot_gradcam(run)

Every function takes a network as an ``nn.Module`` object or as a spec string (a registered
name, ``path/to/file.py:factory``, ``package.module:factory``), on whatever device it lives:
batches go to the network's device and results come back on the CPU. The figures are matplotlib
``Figure`` objects, which Jupyter shows when they end a cell.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import nn

from .config import resolve_config
from .devices import module_device, module_memory_format
from .models import build_model
from .models.registry import source_of_instance
from .models.rules import CheckReport, Rules, check
from .models.summary import format_summary, model_summary
from .reports.report import evaluate_run, gradcam_figure, mistakes_figure, read_history
from .reports.report import plot_curves as _plot_history
from .training.train import RunResult, train

__all__ = ["CheckReport", "Rules", "RunResult", "Summary", "check", "fit", "plot_curves", "plot_gradcam",
           "plot_mistakes", "summary"]


def fit(model: nn.Module | str, preset: str = "seed", **overrides: Any) -> RunResult:
    """Train ``model`` with a preset's recipe; keyword arguments override any config value.

    ``fit(Net(), preset="fast", epochs=5, lr=0.05, aug={"policy": "seed"}, out="runs/try1")``.
    An ``nn.Module`` is trained in place: afterwards its weights are the trained ones, and the
    parameters the recipe froze (a whitening stem's filters, batch-norm scales) keep
    ``requires_grad=False``. It is handed back on the device, in the memory format and in the
    train/eval mode it came in, although training ran on the run's device (a GPU when there is
    one) and in channels_last when the recipe says so.
    ``result.model`` is the network that was evaluated: your module, or the moving average of its
    weights when the preset keeps one (a copy, left on the training device). Returns the run
    folder, the summary (``result.summary["final_acc"]``) and the per-epoch history.
    """
    if isinstance(model, nn.Module):
        cfg = resolve_config(preset, overrides={**overrides, "model": source_of_instance(model).spec})
        with placement_kept(model):
            return train(cfg, model=model)
    cfg = resolve_config(preset, overrides={**overrides, "model": model})
    return train(cfg)


@contextmanager
def placement_kept(module: nn.Module) -> Iterator[None]:
    """Give ``module`` back on its device, in its memory format and mode, whatever happens inside."""
    device, memory_format, training = module_device(module), module_memory_format(module), module.training
    try:
        yield
    finally:
        module.to(device=device, memory_format=memory_format)
        module.train(training)


class Summary(dict):
    """``model_summary``'s dict, printed as the per-layer table."""

    def __str__(self) -> str:
        return format_summary(self)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython / Jupyter
        printer.text(str(self))


def summary(model: nn.Module | str, **model_kwargs: Any) -> Summary:
    """Per-layer output shapes, parameters, MACs and receptive field; ``print()`` shows the table.

    A module is only read: one forward pass of a blank image on its device, in eval mode (its
    batch-norm statistics do not move), and its mode is restored.
    """
    network, _ = build_model(model, model_kwargs)
    return Summary(model_summary(network, name=model if isinstance(model, str) else None))


def _run_dir(run: RunResult | str | Path) -> Path:
    return Path(run.run_dir if isinstance(run, RunResult) else run)


def _network(run: RunResult | str | Path, model: nn.Module | str | None) -> nn.Module | str | None:
    """The network code to load the run's checkpoint into: the one named, else the run's own object;
    a module is copied (on its device), so the caller's keeps its weights and mode."""
    if model is None and isinstance(run, RunResult):
        model = run.model
    return copy.deepcopy(model) if isinstance(model, nn.Module) else model


def _displayable(figure: Figure) -> Figure:
    """``figure``, made sure to show when it ends a Jupyter cell.

    Jupyter displays a ``Figure`` only once matplotlib's inline backend has registered its display
    hook, which pyplot's first figure does; ours are drawn without pyplot (no global figure state),
    so in a kernel where pyplot is not in use yet, ``%matplotlib inline`` is switched on here.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and "IPKernelApp" in shell.config and "matplotlib.pyplot" not in sys.modules:
        shell.run_line_magic("matplotlib", "inline")
    return figure


def plot_curves(run: RunResult | str | Path) -> Figure:
    """Loss and accuracy per epoch, train and test, of a run (a ``fit`` result or a run folder);
    reads the run's files only, no network."""
    run_dir = _run_dir(run)
    config_file = run_dir / "config.json"
    smoothing = json.loads(config_file.read_text()).get("label_smoothing", 0.0) if config_file.is_file() else 0.0
    return _displayable(_plot_history(read_history(run_dir, {}), float(smoothing)))


def plot_mistakes(run: RunResult | str | Path, model: nn.Module | str | None = None, count: int = 24,
                  data: str | Path | None = None) -> Figure:
    """The test images the run's best checkpoint gets wrong with the highest confidence.

    The checkpoint is loaded into a copy of ``model`` (default: the run's network), evaluated on
    that copy's device; the module you pass is not changed.
    """
    return _displayable(mistakes_figure(evaluate_run(_run_dir(run), data, _network(run, model)), count))


def plot_gradcam(run: RunResult | str | Path, model: nn.Module | str | None = None, layer: str | None = None,
                 data: str | Path | None = None) -> Figure:
    """Grad-CAM maps of the most confident mistakes, on ``layer`` (default: the last conv map >= 8x8).

    Like ``plot_mistakes``, on a copy of ``model`` on its device; the module you pass is not changed.
    """
    return _displayable(gradcam_figure(evaluate_run(_run_dir(run), data, _network(run, model)), layer)[0])
