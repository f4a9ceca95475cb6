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


def test_progress_bars_are_tqdm_auto_so_they_render_in_jupyter():
    import tqdm.auto

    assert train_module.tqdm is tqdm.auto.tqdm


def test_importing_tinycifar_stays_light():
    code = "import sys, tinycifar; assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules; " \
           "tinycifar.fit; assert 'matplotlib' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
