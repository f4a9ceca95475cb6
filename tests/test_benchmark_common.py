"""The benchmarks' shared pieces: a result names the kernel variables it ran under, the step
benchmarks time the recipe's batch and run end to end, and the airbench adapter stops at its target
after logging the evaluation that reached it."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import airbench_cpu  # noqa: E402
import common  # noqa: E402
import conv_weight_grad  # noqa: E402

from tinycifar.config import resolve_config  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_command_line_carries_the_variables_that_choose_the_kernels(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/vs_airbench.py", "--out", "x"])
    for name in common.KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert common.command_line().split()[1:] == ["benchmarks/vs_airbench.py", "--out", "x"]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert common.command_line().split()[:2] == ["ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2"]


def test_results_name_the_instruction_sets_the_kernels_ran_with(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert common.kernel_isa()[1] == "native"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert common.kernel_isa()[1] == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")  # oneDNN then reads the older name, as training does
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert common.kernel_isa()[1] == "AVX2"


def test_the_step_benchmarks_time_the_batch_each_precision_trains_at():
    fast = resolve_config("fast")
    assert common.recipe_batch_size("fast", "bf16") == fast.batch_size
    assert common.recipe_batch_size("fast", "fp32") == fast.by_precision["fp32"]["batch_size"] != fast.batch_size


def test_a_step_in_a_precision_is_its_recipes_step():
    """profile_step.py --precision fp32 profiles what a fp32 run trains: batch 128, Muon for the filters."""
    fp32 = common.synthetic_step("fast", torch.channels_last, precision="fp32")
    plain = common.synthetic_step("fast", torch.channels_last)
    assert (fp32.cfg.batch_size, len(fp32.y), plain.cfg.batch_size) == (128, 128, 256)
    assert any(g.get("orthogonalize") for g in fp32.optimizer.param_groups)
    assert not any(g.get("orthogonalize") for g in plain.optimizer.param_groups)


@pytest.mark.parametrize("script, args, parts", [
    ("dilated_depthwise.py", ["--resolutions", "20", "--rounds", "1", "--steps", "1"],
     ["training step, 20x20", "layer: 96 channels, 5x5, dilation 3"]),
    ("page_faults.py", ["--rounds", "1", "--warmup", "1", "--steps", "1", "--batch-size", "16"],
     ["glibc default", "kept"]),
    ("conv_weight_grad.py", ["--resolutions", "16", "--rounds", "1", "--batch-size", "8"],
     ["32->64, stride 2", "96->96, stride 1, dilation 2"]),
    ("fp32_levers.py", ["--rounds", "1", "--steps", "1", "--no-compile", "--resolution", "16", "--frozen-stem",
                        "--late-freeze", "2"],
     ["channels_last", "contiguous", "eager, stem frozen", "eager, first 2 blocks frozen"]),
])
def test_the_step_benchmarks_run_end_to_end(tmp_path, script, args, parts):
    """Each writes its Markdown and JSON with a row per part, measured (a few seconds: one step each)."""
    out = tmp_path / "result"
    subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert all(part in json.dumps(rows) for part in parts)
    timings = [v for r in rows for k, v in r.items() if k.endswith("_ms") and not isinstance(v, str)]
    assert timings and all(v > 0 for v in timings)
    assert out.with_suffix(".md").read_text().startswith("# ")


def test_the_step_profile_runs_end_to_end(tmp_path):
    """profile_step.py on a small fp32 step: every part timed, none (nor "other") below zero."""
    out = tmp_path / "profile"
    subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), "--precision", "fp32", "--steps", "1",
                    "--resolution", "16", "--batch-size", "16", "--ops", "3", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(out.with_suffix(".json").read_text())
    parts = {r["part"] for r in report["rows"]}
    assert {"optimizer", "augmentation", "batch norm", "conv dilated"} <= parts
    assert all(r["ms_per_step"] >= 0 for r in report["rows"])  # the profiler's own cost is in the profiled step
    assert report["profiled_step_seconds"] > 0 and len(report["operators"]) == 3
    assert report["batch"] == 16 and 0 < report["achieved_flops"] < report["matmul_peak_flops"] * 2


@pytest.mark.parametrize("stride, dilation, padding, size", [(1, 2, 2, 8), (1, 2, 2, 5), (2, 1, 1, 16), (2, 1, 1, 15),
                                                            (1, 3, 3, 4), (2, 2, 0, 9), (1, 3, 3, 2)])
def test_the_weight_gradient_by_taps_is_pytorchs(stride, dilation, padding, size):
    """Each tap's matrix product covers exactly the pixels where its shifted input overlaps the map
    (none at all for the corner taps of a 2x2 map at dilation 3)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride, padding, dilation, bias=False)
    x = torch.randn(3, 5, size, size).contiguous(memory_format=torch.channels_last)
    y = conv(x)
    grad = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    expected = torch.autograd.grad(y, conv.weight, grad)[0]
    torch.testing.assert_close(conv_weight_grad.weight_grad_by_taps(grad, x, conv), expected, atol=1e-5, rtol=1e-4)


def test_a_missing_airbench_is_one_line_before_anything_runs(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"^vs_airbench.py: airbench is not installed: pip install airbench==0.1.8"):
        common.require_airbench("vs_airbench.py")


def test_airbench_stops_after_logging_its_first_evaluation_at_the_target(tmp_path):
    accuracies = iter([0.70, 0.851, 0.90])
    utils = types.SimpleNamespace(evaluate=lambda model, loader, tta_level=0: next(accuracies))
    log = tmp_path / "airbench.jsonl"
    airbench_cpu.log_evaluations(utils, log, until=85.0)
    assert utils.evaluate(None, None) == 0.70
    with pytest.raises(airbench_cpu.ReachedTarget):
        utils.evaluate(None, None)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [round(e["accuracy"], 1) for e in logged] == [70.0, 85.1]  # the reaching one is logged first


def test_airbench_without_a_target_and_its_tta_pass_never_stop(tmp_path):
    utils = types.SimpleNamespace(evaluate=lambda model, loader, tta_level=0: 0.95)
    airbench_cpu.log_evaluations(utils, tmp_path / "a.jsonl")
    assert utils.evaluate(None, None) == 0.95
    utils = types.SimpleNamespace(evaluate=lambda model, loader, tta_level=0: 0.95)
    airbench_cpu.log_evaluations(utils, tmp_path / "b.jsonl", until=85.0)
    assert utils.evaluate(None, None, tta_level=2) == 0.95  # only per-epoch (level 0) evaluations count


def test_the_achieved_rate_counts_only_the_gradients_a_step_runs():
    """The whitening stem's filters never get a gradient and images need none, so its backward never runs;
    with its norm frozen, neither does the second convolution's input gradient."""
    import profile_step

    from tinycifar.models import create_model
    from tinycifar.models.summary import model_summary

    model = create_model("fastnet")
    summary = model_summary(model)
    stem, second = model.features[0][0][0], model.features[0][1][0]
    layer_macs = {row["name"]: row["macs"] for row in summary["layers"]}
    m_stem, m_second = layer_macs["features.0.0.0"], layer_macs["features.0.1.0"]
    assert profile_step.macs_run_per_image(model, summary, False) == 3 * summary["macs"] - m_stem  # trains its filters
    stem.weight.requires_grad_(False)
    assert profile_step.macs_run_per_image(model, summary, False) == 3 * summary["macs"] - 2 * m_stem
    assert profile_step.macs_run_per_image(model, summary, True) == 3 * summary["macs"] - 2 * m_stem - m_second
    assert second.weight.requires_grad


def test_the_profiles_parts_and_other_add_up_to_the_profiled_step():
    import profile_step

    ranges = {("convolution", "backward"): 0.060, ("batch norm", "forward"): 0.025}
    rows = profile_step.part_rows(ranges, profiled_seconds=0.100)
    assert [r["part"] for r in rows][:2] == ["convolution", "batch norm"]  # largest first
    assert rows[-1]["part"].startswith("other") and rows[-1]["ms_per_step"] == pytest.approx(15.0)
    assert sum(r["share_%"] for r in rows) == pytest.approx(100.0)


@pytest.mark.parametrize("amx, max_isa, expected", [
    (False, "", 128), (True, "", 1024), (True, "AVX512_CORE_AMX", 1024), (True, "AVX512_CORE_BF16", 128),
])
def test_the_bf16_peak_counts_amx_tiles_only_where_onednn_may_use_them(monkeypatch, amx, max_isa, expected):
    """A 2048x2048 bf16 product ran at 2,374-2,556 GFLOP/s on a 2-core Xeon with AMX, 3.6-3.8x the
    AVX-512 peak the profile used to state; the tile unit's 1024 FLOP per cycle is the honest ceiling."""
    import profile_step

    monkeypatch.setattr(profile_step.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(profile_step.torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", max_isa)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    intel = "vendor_id\t: GenuineIntel\ncpu family\t: 6\n"
    assert profile_step.flop_per_cycle("bf16", intel) == expected
    assert profile_step.flop_per_cycle("fp32", intel) == 64


def test_the_profile_lists_operators_by_their_own_time(tmp_path):
    """Beside the parts timed between module hooks, the operators' self times: the convolutions'
    backward appears by its shapes, and no operator takes more than the step."""
    out = tmp_path / "profile"
    subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), "--precision", "fp32", "--batch-size", "8",
                    "--steps", "2", "--ops", "12", "--out", str(out)], check=True, capture_output=True, text=True,
                   timeout=300)
    report = json.loads(out.with_suffix(".json").read_text())
    operators = report["operators"]
    assert len(operators) == 12
    assert any(op["operator"] == "aten::convolution_backward" and op["input_shapes"].startswith("[8, ")
               for op in operators)
    assert all(0 < op["self_ms_per_step"] <= 1000 * report["step_seconds"] * 1.5 for op in operators)
    assert "operators with the most self time" in out.with_suffix(".md").read_text()


def test_a_profile_with_the_stem_frozen_has_no_backward_through_the_32x32_maps(tmp_path):
    """--frozen-stem profiles the fp32 recipe's 32x32 step: backward stops at the second convolution."""
    shapes = {}
    for flag in ([], ["--frozen-stem"]):
        out = tmp_path / f"profile{len(flag)}"
        subprocess.run([sys.executable, str(BENCHMARKS / "profile_step.py"), "--precision", "fp32", "--batch-size",
                        "8", "--steps", "1", "--ops", "60", *flag, "--out", str(out)], check=True,
                       capture_output=True, text=True, timeout=300)
        shapes[bool(flag)] = [op["input_shapes"] for op in json.loads(out.with_suffix(".json").read_text())["operators"]
                              if op["operator"] == "aten::native_batch_norm_backward"]
    assert any(s.startswith("[8, 32, 32, 32]") for s in shapes[False])
    assert shapes[True] and not any(s.startswith("[8, 32, 32, 32]") for s in shapes[True])
