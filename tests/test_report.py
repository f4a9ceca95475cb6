"""``tinycifar report``: the figures, a self-contained page, and Grad-CAM on a map of at least 8x8."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_run import train_tiny_run
from torch import nn

from tinycifar.cli import main
from tinycifar.config import resolve_config
from tinycifar.models import MODEL_REGISTRY, create_model
from tinycifar.reports.report import find_gradcam_layer, grad_cam, upsample_cam, write_report
from tinycifar.reports.report import test_probabilities as probabilities  # not a test: pytest must not collect it
from tinycifar.serving.inference import NormalizedNet, run_split
from tinycifar.training.train import load_data

FIGURES = ("curves.png", "misclassified.png", "confusion_matrix.png", "reliability.png", "per_class_accuracy.png",
           "augmentations.png", "gradcam.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("run") / "run", aug={"policy": "seed"})


@pytest.fixture(scope="module")
def page(run_dir) -> Path:
    return write_report(run_dir)


def test_report_writes_every_figure(run_dir, page):
    assert page == run_dir / "report.html"
    for name in FIGURES:
        with Image.open(run_dir / name) as img:
            assert img.format == "PNG" and min(img.size) > 300


def test_page_is_self_contained(page):
    text = page.read_text()
    sources = re.findall(r"""\bsrc=['"]([^'"]*)""", text)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<(script|link|iframe)\b|\bhref=|url\(|@import", text)


def test_page_shows_config_metrics_and_layer(page):
    text = page.read_text()
    assert "Metrics per epoch" in text and "train_loss" in text
    assert "aug.policy" in text and "seed" in text
    assert "features.2.1" in text  # the Grad-CAM layer is named


def test_page_states_the_calibration_with_and_without_tta(run_dir, page):
    text = page.read_text()
    found = re.search(r"ECE ([\d.]+)% \(no TTA\), ([\d.]+)% \(TTA \(flip\)\)", text)
    assert found, "the calibration line is missing"
    summary = json.loads((run_dir / "summary.json").read_text())
    # the page evaluates in fp32 like training's evaluation here: the same ECE as summary.json
    assert float(found.group(1)) == pytest.approx(summary["final_ece"], abs=0.01)
    assert "over-confident" in text or "under-confident" in text or "mixed" in text


def test_cli_report(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_cli_report_without_checkpoint_is_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "best.pt" in capsys.readouterr().err


def test_synthetic_data_is_regenerated_exactly(run_dir):
    """The report's copy of a synthetic run's data is the data the run trained and tested on."""
    config = json.loads((run_dir / "config.json").read_text())
    cfg = resolve_config("fast", overrides={k: config[k] for k in ("dataset", "synthetic_size", "seed")})
    train, test = load_data(cfg)
    for split, ours in ((train, run_split(config, train=True)), (test, run_split(config, train=False))):
        assert torch.equal(split.images, ours.images) and torch.equal(split.labels, ours.labels)


# ---------------------------------------------------------------------------- Grad-CAM


def test_era9_gradcam_layer_is_c3_before_its_downsampling():
    name, shape = find_gradcam_layer(create_model("era9"))
    assert name == "features.2.1" and shape == (96, 8, 8)


@pytest.mark.parametrize("model_name", sorted(MODEL_REGISTRY))
def test_chosen_layer_is_the_last_one_of_at_least_8x8(model_name):
    net = create_model(model_name).eval()
    name, shape = find_gradcam_layer(net)
    assert min(shape[1:]) >= 8
    finished = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: finished.append((n, out.shape[-1])))
             for n, m in net.named_modules() if n.startswith("features")]
    net(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    names = [n for n, _ in finished]
    assert all(size < 8 for _, size in finished[names.index(name) + 1 :])


@pytest.mark.parametrize("model_name", sorted(MODEL_REGISTRY))
def test_gradcam_map_shape_finite_nonnegative(model_name):
    torch.manual_seed(0)
    net = create_model(model_name).eval()
    name, shape = find_gradcam_layer(net)
    x = torch.randn(4, 3, 32, 32)
    cam = grad_cam(net, net.get_submodule(name), x, torch.tensor([0, 3, 5, 9]))
    assert cam.shape == (4, *shape[1:]) and min(cam.shape[1:]) >= 8
    assert torch.isfinite(cam).all() and (cam >= 0).all()
    up = upsample_cam(cam)
    assert up.shape == (4, 32, 32) and up.min() >= 0 and up.max() <= 1 + 1e-6


def test_gradcam_runs_on_the_networks_device_with_batches_from_the_cpu():
    """The meta device stands in for a GPU: the CPU batch and targets go to the network."""
    net = create_model("era9").eval().to("meta")
    name, shape = find_gradcam_layer(net)
    cam = grad_cam(net, net.get_submodule(name), torch.randn(2, 3, 32, 32), torch.tensor([1, 4]))
    assert cam.device.type == "meta" and cam.shape == (2, *shape[1:])


class DeviceSpy(nn.Module):
    """A network that lives on ``meta`` and records the device of what it is fed; answers on the CPU."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, device="meta"))
        self.fed: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fed.add(x.device.type)
        return torch.zeros(len(x), 10)


def test_test_probabilities_feed_the_networks_device_and_return_on_the_cpu():
    spy = DeviceSpy()
    model = NormalizedNet(spy, [0.5] * 3, [0.25] * 3)  # its mean and std follow the network to meta
    probs = probabilities(model, torch.zeros(7, 3, 32, 32, dtype=torch.uint8), batch=4, tta="flip")
    assert spy.fed == {"meta"} and probs.device.type == "cpu" and probs.shape == (7, 10)


def test_gradcam_is_not_fooled_by_an_in_place_relu():
    """On a batch norm followed by ReLU(inplace=True), the map uses the batch norm's own output:
    the same as on a copy of the network whose ReLUs are not in place."""
    torch.manual_seed(0)
    net = create_model("era9").eval()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    with torch.no_grad():
        logits_before = net(x)
    cam = grad_cam(net, net.get_submodule("features.2.1.1.1"), x, target)

    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    acts = []
    ref.get_submodule("features.2.1.1.1").register_forward_hook(lambda _m, _i, out: acts.append(out))
    (grad,) = torch.autograd.grad(ref(x).gather(1, target.view(-1, 1)).sum(), acts[0])
    expected = (grad.mean((2, 3), keepdim=True) * acts[0]).sum(1).clamp(min=0)
    scale = expected.max()  # an untrained network's maps are tiny: compare relative to the peak
    assert scale > 0 and torch.allclose(cam / scale, expected / scale, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(net(x), logits_before)  # the hook is gone, nothing changed


def test_augmentation_figure_shows_augmix_views_beside_the_policy():
    from tinycifar.data import synthetic_cifar10
    from tinycifar.reports.report import augmentation_figure, describe_policy, policy_draws

    train, _ = synthetic_cifar10(16)
    cfg = resolve_config("fast", overrides={"aug": {"augmix": "jsd"}})
    mean, std = [0.5] * 3, [0.25] * 3
    fig, text = augmentation_figure(train.images[:3], train.labels[:3], cfg.to_dict(), mean, std)
    assert "AugMix (3 chains, severity 3, the Jensen-Shannon consistency loss on two views)" in text
    assert "AugMix" in describe_policy(cfg.aug) and "AugMix" not in describe_policy(resolve_config("fast").aug)
    assert len(fig.axes) == 3 * 9  # original, 4 policy draws, 4 with AugMix
    plain = policy_draws(train.images[:3], cfg.aug, mean, std, 1)[0]
    mixed = policy_draws(train.images[:3], cfg.aug, mean, std, 1, with_augmix=True)[0]
    assert not torch.allclose(plain, mixed) and mixed.min() >= 0 and mixed.max() <= 1
