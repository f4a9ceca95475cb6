"""airbench94 (Keller Jordan's public CIFAR-10 speed record, `pip install airbench==0.1.8 --no-deps`)
on this CPU, through the smallest adapter we could write. Its network, recipe (9.9 epochs, batch
1024, Nesterov SGD, label smoothing 0.2, Lookahead, whitening stem, alternating flips, translate 2,
TTA level 2) and data loader run unchanged; the adapter changes only what CUDA-only code needs:

1. ``torchvision`` (it does not import beside our torch build) is replaced by a stub module with
   the two things airbench uses: ``datasets.CIFAR10`` (reads the official files with tinycifar's
   safe loader into airbench's NHWC uint8 arrays) and ``transforms.Normalize``.
2. ``net.half().cuda()`` and the loader's ``.half()``: the network and images stay fp32 on the
   CPU and the network's forward runs under bf16 autocast, returning fp32 logits (the CPU has no
   fast fp16); this is how tinycifar itself trains here. The whitening stem's eigendecomposition
   stays in fp32, as in airbench. ``--precision`` chooses as tinycifar's does: ``auto`` (the
   default) is bf16 where the CPU has it natively and plain fp32 elsewhere (AVX2-only CPUs).
3. ``CifarLoader(gpu=0)`` loads to the CPU; ``torch.cuda.Event`` / ``synchronize`` become
   wall-clock timers and no-ops.
4. Each of airbench's own evaluations (per epoch, excluded from its timing; and the final TTA one)
   is logged with the Unix time it ended, so the caller can measure whole-process time to an accuracy.
5. ``--until ACC`` ends the process after airbench's first evaluation at or above ACC: in fp32 on
   an AVX2 CPU its whole run takes about 45 minutes, and time to 85% needs only the first ~6 epochs.

    python benchmarks/airbench_cpu.py --data $CIFAR10_ROOT --log airbench.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from common import require_airbench
from torch import nn

from tinycifar.training.train import resolve_precision


def torchvision_stub(data_root: str) -> types.ModuleType:
    from tinycifar.data import CLASSES, load_split

    class CIFAR10:
        def __init__(self, path, download=True, train=True):
            split = load_split(data_root, train=train)
            self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC uint8, as torchvision
            self.targets = split.labels.tolist()
            self.classes = list(CLASSES)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.as_tensor(mean).view(-1, 1, 1), torch.as_tensor(std).view(-1, 1, 1)

        def __call__(self, x):
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(CIFAR10=CIFAR10)
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Normalize = Normalize
    return tv


class CpuEvent:
    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: CpuEvent) -> float:
        return 1000 * (end.t - self.t)


class ReachedTarget(Exception):
    """Raised by the logged evaluation once ``--until`` is reached, to end airbench's loop there."""


def log_evaluations(utils: types.ModuleType, log_path: Path, until: float | None = None) -> None:
    """Append each of airbench's evaluations to ``log_path`` (JSON lines) with the Unix time it ended,
    so that a caller can measure whole-process time to an accuracy; stop at ``until`` (percent)."""
    original_evaluate = utils.evaluate

    def logged_evaluate(model, loader, tta_level=0):
        accuracy = original_evaluate(model, loader, tta_level)
        with open(log_path, "a") as log:
            log.write(json.dumps({"time": time.time(), "tta_level": tta_level, "accuracy": 100 * accuracy}) + "\n")
        if until is not None and tta_level == 0 and 100 * accuracy >= until:
            raise ReachedTarget
        return accuracy

    utils.evaluate = logged_evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("CIFAR10_ROOT", "./data"))
    ap.add_argument("--log", required=True, help="JSON lines: one per evaluation, with its Unix time")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 where the CPU has it natively, else fp32 (tinycifar's rule)")
    ap.add_argument("--epochs", type=float, default=None, help="default: the recipe's own (9.9); less for a smoke test")
    ap.add_argument("--until", type=float, default=None, metavar="ACC",
                    help="end after the first per-epoch evaluation at or above ACC percent (no final TTA pass)")
    args = ap.parse_args()
    require_airbench("airbench_cpu.py")
    if args.threads:
        torch.set_num_threads(args.threads)

    Path(args.log).write_text("")
    tv = torchvision_stub(args.data)
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})
    torch.cuda.Event, torch.cuda.synchronize = CpuEvent, lambda *a, **k: None
    nn.Module.cuda = lambda self, *a, **k: self
    nn.Module.half = lambda self: self
    torch.Tensor.half = lambda self, *a, **k: self.float()

    import airbench
    from airbench import utils

    defaults = utils.CifarLoader.__init__.__defaults__
    utils.CifarLoader.__init__.__defaults__ = (*defaults[:-1], "cpu")  # gpu=0 -> the CPU
    log_evaluations(utils, Path(args.log).resolve(), args.until)

    precision = resolve_precision(args.precision, torch.device("cpu"))

    def make_net():
        net = airbench.make_net94()
        if precision == "bf16":
            forward = net.forward
            net.forward = lambda x: torch.autocast("cpu", dtype=torch.bfloat16)(forward)(x).float()
        return net

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # CifarLoader caches 'cifar10/train.pt' under the working folder
        Path("cifar10").mkdir()
        try:
            airbench.train94(make_net=make_net, verbose=True, **({"epochs": args.epochs} if args.epochs else {}))
        except ReachedTarget:
            print(f"airbench_cpu: reached {args.until:g}%, stopping (--until)", flush=True)


if __name__ == "__main__":
    main()
