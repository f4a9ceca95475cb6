"""How long augmentation takes over one epoch of the real training set, and how long loading it takes.

For each policy: the median over --repeats runs of the seconds to normalize and augment all
50,000 training images in batches of --batch-size. The batches are contiguous slices of the
uint8 split already in memory, so the random gather of a shuffled epoch is EXCLUDED from that
column; the "loader epoch" column times a whole DeviceLoader epoch (permutation, gather,
normalize, augment) for comparison. Policy "none" is the normalize-only baseline.
Also reported: the median time to load (read, md5-check, unpickle) the training split.

    CIFAR10_ROOT=/path/to/data python benchmarks/augment_speed.py
    python benchmarks/augment_speed.py --root data --repeats 5 --threads 2 --json augment_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, cpu_model  # noqa: E402

from tinycifar.data import load_split  # noqa: E402
from tinycifar.data.augment import AugmentConfig, augment  # noqa: E402
from tinycifar.data.loader import DeviceLoader, channel_stats  # noqa: E402

POLICIES = {
    "none": AugmentConfig(policy="none"),
    "fast": AugmentConfig(policy="fast", cutout_size=8),
    "seed": AugmentConfig(policy="seed"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_load(root: str, repeats: int, verify_md5: bool) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        load_split(root, train=True, verify_md5=verify_md5)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_augment(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: AugmentConfig,
    batch: int,
    device: torch.device,
    seed: int,
) -> float:
    """Normalize + augment every image once, in contiguous batches (no gather)."""
    g = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        x = (images[start : start + batch].float() - mean) / std
        augment(x, cfg, g)
    sync(device)
    return time.perf_counter() - t0


def time_loader_epoch(loader: DeviceLoader, epoch: int, device: torch.device) -> float:
    loader.set_epoch(epoch)
    sync(device)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.environ.get("CIFAR10_ROOT"), help="dataset folder (default $CIFAR10_ROOT)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--allow-modified", action="store_true", help="skip the md5 check when loading")
    p.add_argument("--no-loader", action="store_true", help="skip the whole-DeviceLoader-epoch column")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not args.root:
        p.error("pass --root or set CIFAR10_ROOT")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    load_median, load_times = time_load(args.root, args.repeats, not args.allow_modified)
    split = load_split(args.root, train=True, verify_md5=not args.allow_modified)
    mean_l, std_l = channel_stats(split.images)
    images = split.images.to(device)
    mean = torch.tensor(mean_l, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(std_l, device=device).view(1, -1, 1, 1) * 255

    rows = []
    for name in args.policies:
        cfg = POLICIES[name]
        time_augment(images[: args.batch_size], mean, std, cfg, args.batch_size, device, 0)  # warm-up
        aug = [time_augment(images, mean, std, cfg, args.batch_size, device, r) for r in range(args.repeats)]
        row = {
            "policy": name,
            "config": vars(cfg),
            "augment_s": aug,
            "augment_median_s": statistics.median(aug),
            "images_per_s": len(images) / statistics.median(aug),
        }
        if not args.no_loader:
            loader = DeviceLoader(split, args.batch_size, mean_l, std_l, device, train=True, aug=cfg)
            epochs = [time_loader_epoch(loader, r, device) for r in range(args.repeats)]
            row.update(loader_epoch_s=epochs, loader_epoch_median_s=statistics.median(epochs))
        rows.append(row)

    print(
        f"# augmentation speed: {len(images):,} training images, batch {args.batch_size}, device {device}, "
        f"{torch.get_num_threads()} torch threads, median of {args.repeats}"
    )
    print(f"# cpu: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}")
    print(f"# command: {command_line()}")
    print(
        f"load training split (read{'' if args.allow_modified else ' + md5'} + unpickle): "
        f"{load_median:.3f} s median  (runs: {', '.join(f'{t:.3f}' for t in load_times)})"
    )
    print("normalize + augment, contiguous batches (gather excluded); loader epoch = gather + normalize + augment")
    print(f"{'policy':<8} {'augment s':>10} {'images/s':>10} {'loader epoch s':>15}")
    for r in rows:
        loader_col = f"{r['loader_epoch_median_s']:>15.3f}" if "loader_epoch_median_s" in r else f"{'-':>15}"
        print(f"{r['policy']:<8} {r['augment_median_s']:>10.3f} {r['images_per_s']:>10,.0f} {loader_col}")

    if args.json:
        result = {
            "command": command_line(),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "images": len(images),
            "load_train_median_s": load_median,
            "load_train_s": load_times,
            "policies": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
