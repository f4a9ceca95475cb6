"""Presets resolve to valid recipes whose networks obey the assignment's parameter budget."""

from __future__ import annotations

import pytest

from tinycifar.config import PRESETS, ConfigError, apply_overrides, parse_assignments, resolve_config
from tinycifar.models import MODEL_REGISTRY, count_params, create_model
from tinycifar.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves_to_a_registered_network_under_200k_parameters(preset):
    cfg = resolve_config(preset)
    assert cfg.preset == preset
    assert cfg.model in MODEL_REGISTRY
    assert count_params(create_model(cfg.model)) < 200_000


def test_command_line_overrides_beat_the_preset():
    cfg = resolve_config("best", overrides=parse_assignments(["epochs=3", "aug.cutout_size=0", "model=slimres50k"]))
    assert (cfg.epochs, cfg.aug.cutout_size, cfg.model) == (3, 0, "slimres50k")
    assert cfg.aug.translate_pad == PRESETS["best"]["aug"]["translate_pad"]  # the rest of the table stays


def test_apply_overrides_layers_a_copy_and_keeps_the_rest_of_the_aug_table():
    """The benchmarks stack a variant on a resolved config; the base must stay reusable."""
    base = resolve_config("fast")
    variant = apply_overrides(base, {"batch_size": 128, "aug": {"cutout_size": 4}}, "variant")
    assert (variant.batch_size, variant.aug.cutout_size) == (128, 4)
    assert variant.aug.policy == base.aug.policy == "fast"
    assert (base.batch_size, base.aug.cutout_size) == (256, 0)  # untouched
    with pytest.raises(ConfigError, match="variant: unknown option 'nope'"):
        apply_overrides(base, {"nope": 1}, "variant")


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="--preset 'nope'.*best"):
        resolve_config("nope")


@pytest.mark.parametrize("model", ["slimres50k", "slimres200k_se"])
def test_best_recipe_trains_the_slimres_family_end_to_end(tmp_path, model):
    """Whitening stem, low-resolution epochs, TTA and alternating flips all fit these networks."""
    cfg = resolve_config("best", overrides=dict(
        model=model, dataset="synthetic", synthetic_size=512, epochs=3, batch_size=64, lr=0.05, threads=1,
        device="cpu", quiet=True, out=str(tmp_path / "run")))  # 8 steps an epoch: a gentler peak lr
    result = train(cfg)
    assert len(result.history) == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.summary["final_acc"] > 35  # chance is 10%; measured 55 and 66
    assert "final_acc_tta" in result.summary
    assert 0 <= result.summary["final_ece_tta"] <= 100 and 0 <= result.summary["final_ece"] <= 100
