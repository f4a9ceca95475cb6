"""The benchmarks' shared pieces: a result names the kernel variables it ran under, and the airbench
adapter stops at its target after logging the evaluation that reached it."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import airbench_cpu  # noqa: E402
import common  # noqa: E402


def test_the_command_line_carries_the_variables_that_choose_the_kernels(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/vs_airbench.py", "--out", "x"])
    for name in common.KERNEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert common.command_line().split()[1:] == ["benchmarks/vs_airbench.py", "--out", "x"]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert common.command_line().split()[:2] == ["ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2"]


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
