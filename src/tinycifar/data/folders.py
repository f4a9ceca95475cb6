"""Your own images in class folders (the common ImageFolder layout) as train and test splits.

    DIR/train/<class>/*.png|jpg|...      DIR/test/<class>/...   (or DIR/val/<class>/...)

Class names are the training folder's subfolders, sorted; any number from 2 up. Every file is
decoded once with ``images.decode_image`` (what ``predict`` and ``serve`` do to an upload) to
``image_size`` x ``image_size`` uint8, and the splits are cached beside the data in
``DIR/.tinycifar-cache-<size>.pt`` (tensors only, read back with ``weights_only=True``), keyed
by every file's path, size and modification time, so an added, removed or edited file rebuilds it.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_write_bytes
from .cifar10 import DatasetError, Split
from .images import ImageLoadError, decode_image

TEST_FOLDERS = ("test", "val")
CACHE_VERSION = 1


@dataclass
class FolderFiles:
    """What a split's folders hold: files by class, before decoding."""

    classes: list[str]
    files: list[tuple[Path, int]] = field(default_factory=list)  # (file, class index)


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_split(split_dir: Path, classes: list[str]) -> FolderFiles:
    found = FolderFiles(classes)
    for index, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                found.files.append((path, index))
    return found


def find_splits(root: Path) -> tuple[Path, Path, list[str]]:
    """The train and test folders and the class names, with the layout's errors said in one line."""
    if not root.is_dir():
        raise DatasetError(f"--data {root}: not a folder (expected {root}/train/<class>/ and {root}/test/<class>/)")
    train_dir = root / "train"
    test_dir = next((root / n for n in TEST_FOLDERS if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = "train/" if not train_dir.is_dir() else "test/ (or val/)"
        raise DatasetError(f"--data {root}: no {missing} folder; expected train/<class>/ and test/<class>/ "
                           "(one subfolder of images per class)")
    classes = class_folders(train_dir)
    if len(classes) < 2:
        raise DatasetError(f"{train_dir}: {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a "
                           "classifier needs at least 2")
    unknown = sorted(set(class_folders(test_dir)) - set(classes))
    if unknown:
        raise DatasetError(f"{test_dir}: class folder(s) {', '.join(unknown)} not in {train_dir} "
                           f"(classes: {', '.join(classes)})")
    return train_dir, test_dir, classes


def fingerprint(listings: list[FolderFiles], image_size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} size={image_size}".encode())
    for listing in listings:
        h.update("\0".join(listing.classes).encode())
        for path, label in listing.files:
            st = path.stat()
            h.update(f"\0{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def decode_split(listing: FolderFiles, image_size: int, strict: bool,
                 skipped: list[tuple[str, str]]) -> Split:
    images, labels = [], []
    for path, label in listing.files:
        try:
            images.append(decode_image(path, image_size))
            labels.append(label)
        except ImageLoadError as e:
            if strict:
                raise DatasetError(f"{path}: {e} (--strict refuses unreadable files)") from None
            skipped.append((str(path), str(e)))
    if not images:
        return Split(torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                     tuple(listing.classes))
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long), tuple(listing.classes))


def check_classes(split: Split, split_dir: Path, classes: list[str], every_class: bool) -> None:
    counts = torch.bincount(split.labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]
    if every_class and empty:
        raise DatasetError(f"{split_dir}: class folder(s) {', '.join(empty)} hold no readable images")
    if len(split) == 0:
        raise DatasetError(f"{split_dir}: no readable images")


def load_image_folders(root: str | Path, image_size: int = 32, strict: bool = False,
                       quiet: bool = False) -> tuple[Split, Split]:
    """Train and test splits of a class-folder dataset, from its cache when the files are unchanged."""
    root = Path(root)
    train_dir, test_dir, classes = find_splits(root)
    listings = [list_split(train_dir, classes), list_split(test_dir, classes)]
    key = fingerprint(listings, image_size)
    cache = root / f".tinycifar-cache-{image_size}.pt"
    cached = read_cache(cache, key)
    if cached is not None:
        train, test, skipped = cached
    else:
        skipped: list[tuple[str, str]] = []
        train = decode_split(listings[0], image_size, strict, skipped)
        test = decode_split(listings[1], image_size, strict, skipped)
    check_classes(train, train_dir, classes, every_class=True)
    check_classes(test, test_dir, classes, every_class=False)
    if skipped and strict:
        raise DatasetError(f"{skipped[0][0]}: {skipped[0][1]} (--strict refuses unreadable files)")
    if skipped and not quiet:
        listed = "".join(f"\n  {path}: {why}" for path, why in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        print(f"tinycifar: skipped {len(skipped)} unreadable file(s) in {root} (--strict refuses them):{listed}{more}",
              file=sys.stderr)
    if cached is None:
        write_cache(cache, key, train, test, skipped)
    return train, test


def read_cache(path: Path, key: str) -> tuple[Split, Split, list[tuple[str, str]]] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
        if state.get("key") != key:
            return None
        classes = tuple(state["classes"])
        return (Split(state["train_images"], state["train_labels"], classes),
                Split(state["test_images"], state["test_labels"], classes),
                [tuple(s) for s in state["skipped"]])
    except Exception:  # noqa: BLE001 - a damaged or foreign cache is rebuilt, never trusted
        return None


def write_cache(path: Path, key: str, train: Split, test: Split, skipped: list[tuple[str, str]]) -> None:
    state = {"key": key, "classes": list(train.classes), "train_images": train.images, "train_labels": train.labels,
             "test_images": test.images, "test_labels": test.labels, "skipped": [list(s) for s in skipped]}
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    except OSError as e:  # a read-only dataset still trains; it is decoded again next time
        print(f"tinycifar: cannot write the cache {path} ({e.strerror or e}); the images are decoded again "
              "next time", file=sys.stderr)
