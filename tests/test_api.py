"""The notebook API: fit, check, summary and the plotting helpers, on objects and on specs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import tinycifar
from tinycifar.training import train as train_module

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"dataset": "synthetic", "synthetic_size": 300, "epochs": 2, "batch_size": 50, "quiet": True, "threads": 1}


class TinyNet(nn.Module):
    """Defined in a test, handed over as an object: no spec, no registry."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.down(torch.relu(self.conv(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model = TinyNet()
    before = model.fc.weight.detach().clone()
    run = tinycifar.fit(model, preset="fast", out=str(tmp_path_factory.mktemp("api") / "run"), **SMALL)
    return model, before, run


def test_fit_trains_the_object_in_place_and_returns_the_run(fitted):
    model, before, run = fitted
    assert not torch.equal(model.fc.weight.detach(), before)
    assert run.summary["epochs_run"] == 2 and len(run.history) == 2
    assert (run.run_dir / "best.pt").is_file() and run.model is not None
    assert run.summary["model"].endswith("test_api.py:TinyNet")


def test_fit_takes_a_spec_and_any_override(tmp_path):
    run = tinycifar.fit("era9", preset="seed", out=str(tmp_path / "run"), aug={"policy": "none"}, **SMALL)
    config = (tmp_path / "run" / "config.json").read_text()
    assert run.summary["model"] == "era9" and '"policy": "none"' in config


def test_plot_helpers_return_figures(fitted):
    _, _, run = fitted
    for fig in (tinycifar.plot_curves(run), tinycifar.plot_mistakes(run), tinycifar.plot_gradcam(run),
                tinycifar.plot_curves(run.run_dir)):
        assert isinstance(fig, Figure) and fig.axes


def test_plots_of_a_run_folder_of_an_object_need_the_object(fitted):
    model, _, run = fitted
    with pytest.raises(Exception, match="pass it again|pass --model"):
        tinycifar.plot_mistakes(run.run_dir)
    assert isinstance(tinycifar.plot_mistakes(run.run_dir, model=TinyNet()), Figure)


def test_check_and_summary_on_objects_and_specs():
    report = tinycifar.check(TinyNet())
    assert isinstance(report, tinycifar.CheckReport) and not report.passed
    assert {r.name for r in report.results if not r.passed} == {
        "receptive field", "depthwise-separable conv", "dilated conv"}
    assert tinycifar.check("era9").passed
    table = str(tinycifar.summary("fastnet"))
    assert "177,930 parameters" in table and "receptive field 53" in table
    assert tinycifar.summary(TinyNet())["params"] == sum(p.numel() for p in TinyNet().parameters())


def test_fit_hands_the_module_back_as_it_came(fitted):
    """The recipe trains in channels_last (and on a GPU when there is one); the caller's module comes
    back in its own layout and mode, and check keeps its gradient cross-check."""
    model, _, _ = fitted
    assert model.conv.weight.is_contiguous() and model.training
    assert "cross-checked by gradient" in tinycifar.check(model).format()
    assert tinycifar.summary(model)["params"] == sum(p.numel() for p in model.parameters())


def test_fit_restores_device_memory_format_and_mode_even_when_training_fails(monkeypatch):
    """The meta device stands in for the caller's, the CPU for the GPU that training moves the module to."""
    def train_elsewhere(cfg, model):
        model.to_empty(device="cpu").to(memory_format=torch.channels_last).train()  # meta has no values to move
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tinycifar.api, "train", train_elsewhere)
    model = TinyNet().to("meta").eval()
    with pytest.raises(RuntimeError, match="out of memory"):
        tinycifar.fit(model, preset="fast", **SMALL)
    assert model.conv.weight.device.type == "meta" and model.conv.weight.is_contiguous() and not model.training


def test_summary_and_check_run_a_module_on_its_own_device():
    """A module on meta (standing in for a GPU) fed the CPU's blank batches failed; now the batch goes
    to it. The gradient probe needs values, which meta has not: there it is the one rule left out."""
    on_cpu, on_meta = TinyNet(), TinyNet().to("meta")
    assert tinycifar.summary(on_meta) == tinycifar.summary(on_cpu)
    rules = [(r.name, r.passed, r.value) for r in tinycifar.check(on_cpu).results]
    assert [(r.name, r.passed, r.value) for r in tinycifar.check(on_meta).results] == rules


def test_plots_leave_a_module_they_are_given_unchanged(fitted):
    model, _, run = fitted
    given = TinyNet().train()
    before = {k: v.clone() for k, v in given.state_dict().items()}
    tinycifar.plot_mistakes(run, model=given)
    assert given.training and all(torch.equal(v, before[k]) for k, v in given.state_dict().items())


def test_progress_bars_are_tqdm_auto_so_they_render_in_jupyter():
    import tqdm.auto

    assert train_module.tqdm is tqdm.auto.tqdm


def test_importing_tinycifar_stays_light():
    code = "import sys, tinycifar; assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules; " \
           "tinycifar.fit; assert 'matplotlib' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
