"""benchmarks/inference.py: bf16 is measured only where the CPU computes it natively."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from tinycifar.models import create_model
from tinycifar.serving.inference import NormalizedNet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("avx512_bf16", "amx", "measured"), [
    (False, False, ["pytorch-fp32"]),  # a Zen 3, an Intel laptop: autocast would only emulate bf16
    (True, False, ["pytorch-fp32", "pytorch-bf16"]),
    (False, True, ["pytorch-fp32", "pytorch-bf16"]),
])
def test_bf16_is_skipped_where_the_cpu_only_emulates_it(bench, monkeypatch, avx512_bf16, amx, measured):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # the hardware alone decides here
        monkeypatch.delenv(cap, raising=False)
    model = NormalizedNet(create_model("era9"), [0.5] * 3, [0.25] * 3).eval()
    assert list(bench.pytorch_runners(model)) == measured


def test_speed_rows_compare_int8_with_fp32_without_a_bf16_row(bench):
    def constant(x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 10), np.float32)

    runners = {"pytorch-fp32": constant, "ort-fp32": constant, "ort-int8": constant}
    rows = bench.speed_rows("net", runners, Namespace(batch_sizes=[2], seconds=0.0, repeats=1))
    assert [r["engine"] for r in rows] == list(runners)
    assert rows[2]["int8 / ort-fp32 at batch 2"] > 0
