"""Where samples come from, each with a stable sample ID. Nothing is downloaded at run time.

A source yields a ``RawDataset``: uint8 images (N, C, H, W), integer labels and the IDs. Lethe
copies it into its own store at ingest (``worker.data.catalog``) and trains only from that copy.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

TORCHVISION_FILES = {
    "mnist": (
        "MNIST/raw",
        [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ],
    ),
    "fashion-mnist": (
        "FashionMNIST/raw",
        [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ],
    ),
    "cifar10": (
        "cifar-10-batches-py",
        [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"],
    ),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
SOURCES = ("digits", "digits-noisy", *TORCHVISION_FILES, "imagefolder")
# digits-noisy: a seeded fifth of the labels replaced by a wrong one. Models must memorise those
# samples to fit them, so membership is measurable per sample (the audit's memorising case).
NOISY_LABEL_SHARE = 0.2


class SourceUnavailable(Exception):
    """The files a source reads are not where they were expected."""


@dataclass(frozen=True)
class RawDataset:
    name: str
    sample_ids: list[str]
    images: NDArray[np.uint8]  # (N, C, H, W)
    labels: NDArray[np.int64]
    num_classes: int


def open_source(name: str, root: Path | None = None, manifest: Path | None = None) -> RawDataset:
    """The named source; ``root`` is the folder of a torchvision data set, ``manifest`` the CSV of
    an image folder."""
    if name == "digits":
        return load_digits()
    if name == "digits-noisy":
        return with_label_noise(load_digits(), "digits-noisy", NOISY_LABEL_SHARE, seed=0)
    if name in TORCHVISION_FILES:
        if root is None:
            raise SourceUnavailable(f"{name} is read from a local folder: pass its root")
        return load_torchvision(name, root)
    if name == "imagefolder":
        if manifest is None:
            raise SourceUnavailable("imagefolder needs a CSV manifest (sample_id,path,label)")
        return load_image_folder(manifest)
    raise SourceUnavailable(f"unknown source {name!r}; known: {', '.join(SOURCES)}")


def with_label_noise(raw: RawDataset, name: str, share: float, seed: int) -> RawDataset:
    """``raw`` under another name, a seeded ``share`` of its labels replaced by a wrong one
    (adding 1..C-1 modulo C never gives back the true label). The sample IDs carry the new name,
    so both data sets can live in one ledger."""
    rng = np.random.default_rng(seed)
    labels = raw.labels.copy()
    noisy = rng.random(len(labels)) < share
    labels[noisy] = (labels[noisy] + rng.integers(1, raw.num_classes, int(noisy.sum()))) % (
        raw.num_classes
    )
    ids = [f"{name}-{sid.rsplit('-', 1)[-1]}" for sid in raw.sample_ids]
    return RawDataset(name, ids, raw.images, labels, raw.num_classes)


def noisy_label_ids(raw: RawDataset, clean: RawDataset) -> set[str]:
    """The samples of ``raw`` whose label differs from ``clean``'s (same order)."""
    return {
        sid
        for sid, label, truth in zip(raw.sample_ids, raw.labels, clean.labels, strict=True)
        if label != truth
    }


def load_digits() -> RawDataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    # Pixel values are 0..16; scale to the 0..255 of every other source.
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    ids = [f"digits-{i:04d}" for i in range(len(images))]
    return RawDataset("digits", ids, images, bunch.target.astype(np.int64), 10)


def load_torchvision(name: str, root: Path) -> RawDataset:
    from torchvision import datasets

    folder, files = TORCHVISION_FILES[name]
    missing = [f for f in files if not (root / folder / f).exists()]
    if missing:
        raise SourceUnavailable(
            f"{name}: expected {', '.join(missing)} under {root / folder} (Lethe never downloads; "
            "fetch the files with torchvision once and point --data-root at their root)"
        )
    kind = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    parts = []
    for split in ("train", "test"):
        data = kind(str(root), train=split == "train", download=False)
        images = np.asarray(data.data, dtype=np.uint8)
        # MNIST-like sets are (N, H, W); CIFAR is (N, H, W, C).
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        ids = [f"{name}-{split}-{i:05d}" for i in range(len(images))]
        parts.append((ids, images, np.asarray(data.targets, dtype=np.int64), len(data.classes)))
    return RawDataset(
        name,
        parts[0][0] + parts[1][0],
        np.concatenate([parts[0][1], parts[1][1]]),
        np.concatenate([parts[0][2], parts[1][2]]),
        parts[0][3],
    )


def load_image_folder(manifest: Path) -> RawDataset:
    """A CSV with a header ``sample_id,path,label``; paths are relative to the CSV's folder. Every
    image is converted to the mode of the first and must share its size. Integer labels are
    kept; other labels are numbered in sorted order."""
    from PIL import Image

    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SourceUnavailable(f"{manifest}: no rows")
    images = []
    mode = None
    for row in rows:
        path = manifest.parent / row["path"]
        if not path.exists():
            raise SourceUnavailable(f"{manifest}: {row['sample_id']} names missing file {path}")
        with Image.open(path) as image:
            mode = mode or ("L" if image.mode in ("L", "1", "I", "F") else "RGB")
            images.append(np.asarray(image.convert(mode), dtype=np.uint8))
    if len({image.shape for image in images}) != 1:
        raise SourceUnavailable(f"{manifest}: images differ in size; resize them first")
    stacked = np.stack(images)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    labels = _label_indices([row["label"] for row in rows])
    return RawDataset(
        manifest.stem,
        [row["sample_id"] for row in rows],
        stacked,
        labels,
        int(labels.max()) + 1,
    )


def _label_indices(labels: list[str]) -> NDArray[np.int64]:
    if all(label.strip().lstrip("-").isdigit() for label in labels):
        return np.asarray([int(label) for label in labels], dtype=np.int64)
    index = {name: i for i, name in enumerate(sorted(set(labels)))}
    return np.asarray([index[label] for label in labels], dtype=np.int64)
