"""Write some CIFAR-10 classes as image files in class folders: a stand-in for your own photos.

    python examples/cifar_folders.py --data $CIFAR10_ROOT --out pets --classes cat dog horse --per-class 1000

gives pets/train/<class>/*.png and pets/test/<class>/*.png (the ImageFolder layout), which
`tinycifar train --dataset folder --data pets` trains on like any folder of your own images.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from PIL import Image

from tinycifar.data import CLASSES, load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("CIFAR10_ROOT", "./data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--classes", nargs="+", default=["cat", "dog", "horse"], choices=CLASSES)
    ap.add_argument("--per-class", type=int, default=1000, help="training images per class (test: a fifth)")
    args = ap.parse_args()
    for split_name, train, count in (("train", True, args.per_class), ("test", False, max(args.per_class // 5, 1))):
        split = load_split(args.data, train=train)
        for name in args.classes:
            folder = args.out / split_name / name
            folder.mkdir(parents=True, exist_ok=True)
            indices = (split.labels == CLASSES.index(name)).nonzero().flatten()[:count]
            for i in indices.tolist():
                Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    print(f"wrote {args.out}/train and {args.out}/test: {', '.join(args.classes)}")


if __name__ == "__main__":
    main()
