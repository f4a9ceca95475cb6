"""Presets resolve to valid recipes whose networks obey the assignment's parameter budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tinycifar.config import (
    PRESETS,
    ConfigError,
    apply_overrides,
    apply_precision_recipe,
    parse_assignments,
    resolve_config,
    train_resolution,
)
from tinycifar.models import MODEL_REGISTRY, count_params, create_model
from tinycifar.training.selection import selects_hardest
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


def documented_precision_recipes() -> dict[str, dict]:
    """The `fast` preset's overrides by precision as docs/training.md's table states them."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    rows = re.findall(r"^\| (bf16|fp32) \|[^|\n]*\| `(\{[^`]*\})` \|", text, re.MULTILINE)
    return {precision: json.loads(table) for precision, table in rows}


def test_the_fast_recipe_chosen_for_each_precision_is_the_documented_one():
    documented = documented_precision_recipes()
    assert set(documented) == {"bf16", "fp32"}
    for precision, table in documented.items():
        cfg = resolve_config("fast")
        assert apply_precision_recipe(cfg, precision) == table, f"docs/training.md, the {precision} row"
    bf16, fp32 = resolve_config("fast"), resolve_config("fast")
    apply_precision_recipe(bf16, "bf16")
    apply_precision_recipe(fp32, "fp32")
    assert bf16 == resolve_config("fast")  # the bf16 recipe is the preset itself, unchanged
    assert bf16.model == fp32.model == "fastnet"
    low_res_epochs = [int(c.low_res_fraction * c.epochs) for c in (bf16, fp32)]
    assert low_res_epochs == [2, 2] and (bf16.epochs, fp32.epochs) == (6, 5)
    sizes = [[train_resolution(c, epoch) or 32 for epoch in range(c.epochs)] for c in (bf16, fp32)]
    assert sizes == [[20, 20, 32, 32, 32, 32], [20, 20, 32, 32, 32]]
    assert (bf16.batch_size, fp32.batch_size) == (256, 128)
    assert (bf16.aug.alternate_flip, fp32.aug.alternate_flip) == (False, True)
    assert (bf16.freeze_stem_after, fp32.freeze_stem_after) == (-1, low_res_epochs[1])  # for the 32x32 epochs
    assert (bf16.keep_hardest, fp32.keep_hardest) == (1.0, 0.55)
    assert (bf16.muon_lr, fp32.muon_lr) == (0.0, 0.02)  # Muon for the full convolutions' filters in fp32 only
    # every epoch but the first selects: the second 20x20 one and the three 32x32 ones
    assert [selects_hardest(fp32, epoch) for epoch in range(fp32.epochs)] == [False] + [True] * 4
    assert not any(selects_hardest(bf16, epoch) for epoch in range(bf16.epochs))


def test_what_the_config_file_or_command_line_sets_beats_the_precision_recipe():
    cfg = resolve_config("fast", file_values={"low_res_fraction": 0.34},
                         overrides=parse_assignments(["aug.alternate_flip=false", "epochs=8"]))
    kept_out = {"batch_size": 128, "lr": 0.22, "muon_lr": 0.02, "freeze_stem_after": 2, "keep_hardest": 0.55,
                "keep_hardest_epochs": 4}
    assert cfg.by_precision == {"fp32": kept_out}  # set: left out
    assert apply_precision_recipe(cfg, "fp32") == kept_out
    assert (cfg.low_res_fraction, cfg.aug.alternate_flip, cfg.epochs, cfg.batch_size) == (0.34, False, 8, 128)
    kept = resolve_config("fast", overrides={"aug": {"translate_pad": 3}})
    assert apply_precision_recipe(kept, "fp32") == {"epochs": 5, **kept_out, "low_res_fraction": 0.4,
                                                    "aug": {"alternate_flip": True}}
    assert (kept.aug.translate_pad, kept.aug.alternate_flip) == (3, True)
    off = resolve_config("fast", overrides=parse_assignments(["by_precision={}"]))
    assert apply_precision_recipe(off, "fp32") == {} and off.low_res_fraction == 0.34


def test_choosing_another_optimizer_drops_the_fp32_recipes_muon():
    """Muon's filters step inside our SGD: --optimizer adam takes the fp32 table without it, not a refusal;
    muon_lr set beside it is refused in one line (test_cli.py)."""
    adam = resolve_config("fast", overrides={"optimizer": "adam"})
    assert "muon_lr" not in adam.by_precision["fp32"]
    apply_precision_recipe(adam, "fp32")
    assert (adam.optimizer, adam.muon_lr, adam.epochs) == ("adam", 0.0, 5)
    sgd = resolve_config("fast", overrides={"optimizer": "sgd"})
    apply_precision_recipe(sgd, "fp32")
    assert sgd.muon_lr == 0.02


def test_applying_the_precision_recipe_twice_changes_nothing():
    """A resumed run starts from the config that already holds it."""
    once = resolve_config("fast")
    apply_precision_recipe(once, "fp32")
    twice = apply_overrides(once, {}, "copy")
    apply_precision_recipe(twice, "fp32")
    assert twice == once


@pytest.mark.parametrize("table, complaint", [
    ({"fp64": {}}, "by_precision: expected tables of options under bf16, fp16, fp32, got 'fp64'"),
    ({"fp32": 3}, "by_precision: expected tables of options"),
    ({"fp32": {"epochz": 3}}, "by_precision.fp32: unknown option 'epochz'"),
    ({"fp32": {"epochs": 0}}, "by_precision.fp32: --epochs: expected a positive integer, got 0"),
    ({"fp32": {"aug": {"flip": 2}}}, "by_precision.fp32: aug.flip: expected a probability in [0, 1], got 2"),
    ({"fp32": {"precision": "bf16"}}, "by_precision.fp32: cannot set precision"),
])
def test_a_bad_precision_table_is_named_before_the_run(table, complaint):
    with pytest.raises(ConfigError) as e:
        resolve_config("fast", overrides={"by_precision": table})
    assert str(e.value).startswith(complaint)
