"""Exported models against PyTorch on the real test set: top-1 agreement and logit differences.

    python benchmarks/export_agreement.py --checkpoint runs/seed-ref/best.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info  # noqa: E402

from tinycifar.serving.export import export_onnx, export_torchscript  # noqa: E402
from tinycifar.serving.inference import load_inference_model, run_split, to_unit_float  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default=None, help="the network's code, for a checkpoint of your own network")
    ap.add_argument("--out", default="benchmarks/results/export_agreement.json")
    args = ap.parse_args()
    model, state = load_inference_model(args.checkpoint, args.model)
    x = to_unit_float(run_split(state["config"], train=False, data=args.data).images)
    with torch.no_grad():
        reference = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)]).numpy()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, ts_path = Path(tmp) / "m.onnx", Path(tmp) / "m.pt"
        export_onnx(model, onnx_path)
        export_torchscript(model, ts_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        onnx_logits = np.concatenate([session.run(None, {name: x[i : i + 1000].numpy()})[0]
                                      for i in range(0, len(x), 1000)])
        scripted = torch.jit.load(str(ts_path))
        with torch.no_grad():
            ts_logits = torch.cat([scripted(x[i : i + 1000]) for i in range(0, len(x), 1000)]).numpy()
    for fmt, logits in (("onnx", onnx_logits), ("torchscript", ts_logits)):
        results[fmt] = {"images": len(x),
                        "top1_agreement_percent": float(100 * (logits.argmax(1) == reference.argmax(1)).mean()),
                        "max_abs_logit_diff": float(np.abs(logits - reference).max())}
    report = {"command": command_line(), "machine": machine_info(), "checkpoint": args.checkpoint, **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
