"""airbench94 as published, on a CUDA GPU, on the data tinycifar reads: the comparison row of gpu_check.sh.

airbench's loader reads ``cifar10/train.pt`` and ``cifar10/test.pt`` under the working folder when
they exist and downloads through torchvision only when they don't, which the lent GPU machine
(no network) cannot. So this script writes them from tinycifar's loader (NHWC uint8 images, int64
labels and the class names: what airbench itself saves), logs each of airbench's evaluations with
its Unix time (``airbench_cpu.log_evaluations``), and calls ``airbench.train94()`` unchanged: its fp16
network, loader, timing and TTA. airbench is installed with ``pip install --no-deps`` from a wheel
carried with the call (benchmarks/gpu_check.sh says how); torchvision must be importable (the lent
machine's image has it).

    python benchmarks/airbench_gpu.py --data DIR [--allow-modified] --log airbench.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from airbench_cpu import log_evaluations  # noqa: E402


def write_airbench_cache(folder: Path, data: str, verify_md5: bool) -> None:
    """``folder``/train.pt and test.pt in airbench's own format, from tinycifar's safe loader."""
    from tinycifar.data import CLASSES, load_split

    for train, name in ((True, "train.pt"), (False, "test.pt")):
        split = load_split(data, train=train, verify_md5=verify_md5)
        images = split.images.permute(0, 2, 3, 1).contiguous()  # NHWC, as torchvision's CIFAR10.data
        torch.save({"images": images, "labels": split.labels, "classes": list(CLASSES)}, folder / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a CIFAR-10 folder tinycifar reads (cifar-10-batches-py/ in it)")
    ap.add_argument("--allow-modified", action="store_true", help="skip the md5 check (gpu_check.sh's synthetic tree)")
    ap.add_argument("--log", required=True, help="JSON lines: one per evaluation, with its Unix time")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("airbench_gpu.py: no CUDA device; airbench94 as published runs on a GPU only (airbench_cpu.py "
                 "is the CPU adapter)")
    import airbench
    from airbench import utils

    log_path = Path(args.log).resolve()
    log_path.write_text("")
    log_evaluations(utils, log_path)
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # CifarLoader reads 'cifar10/train.pt' under the working folder
        Path("cifar10").mkdir()
        write_airbench_cache(Path("cifar10"), data, verify_md5=not args.allow_modified)
        airbench.train94(verbose=True)


if __name__ == "__main__":
    main()
