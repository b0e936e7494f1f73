"""Dataset sources, Lethe's copy in the store, deterministic splits and erasure."""

import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy.orm import Session

from app.ledger.samples import get_sample, sample_ids
from app.ledger.tables import Split
from tests.unit.worker_support import digits_store
from worker.data import (
    SourceUnavailable,
    assign_splits,
    content_sha256,
    erase_samples,
    ingest,
    load_samples,
    load_split,
    open_source,
)


def test_splits_are_deterministic_disjoint_and_sized() -> None:
    ids = [f"s-{i:04d}" for i in range(1000)]
    splits = assign_splits(ids, seed=3)
    assert splits == assign_splits(list(reversed(ids)), seed=3)
    assert splits != assign_splits(ids, seed=4)
    assert Counter(splits.values()) == {
        Split.train: 500,
        Split.heldout: 150,
        Split.test: 150,
        Split.pool: 200,
    }


def test_ingest_copies_and_registers_every_digit(session: Session, tmp_path: Path) -> None:
    store = digits_store(session, tmp_path)
    copy = load_samples(store, "digits")
    assert len(copy) == 1797 and copy.num_classes == 10
    assert copy.images.shape[1:] == (1, 8, 8)
    first = get_sample(session, "digits-0000")
    assert first.content_sha256 == content_sha256(copy.images[0].numpy())
    assert ingest(session, store, open_source("digits")) == 0  # re-runnable
    train = load_split(session, store, "digits", Split.train, exclude=["digits-0000"])
    assert train.sample_ids == [
        s for s in sample_ids(session, "digits", Split.train) if s != "digits-0000"
    ]


def test_erasure_removes_raw_data_from_every_copy(session: Session, tmp_path: Path) -> None:
    store = digits_store(session, tmp_path)
    before = store.list("datasets/digits/shards")
    receipts = erase_samples(store, "digits", ["digits-0007", "digits-0100"])

    assert [r["erased"] for r in receipts] == [["digits-0007", "digits-0100"]]
    assert store.list("datasets/digits/shards") == [receipts[0]["new_key"]]
    assert receipts[0]["old_key"] in before and not store.exists(receipts[0]["old_key"])
    remaining = load_samples(store, "digits")
    assert len(remaining) == 1795 and "digits-0007" not in remaining.sample_ids
    assert load_samples(store, "digits", ["digits-0007", "digits-0008"]).sample_ids == [
        "digits-0008"
    ]
    assert erase_samples(store, "digits", ["digits-0007"]) == []  # idempotent
    ingest(session, store, open_source("digits"))  # re-ingest does not bring it back
    assert "digits-0007" not in load_samples(store, "digits").sample_ids


def test_image_folder_with_csv_manifest(tmp_path: Path) -> None:
    rows = ["sample_id,path,label"]
    for i in range(4):
        pixels = np.full((5, 6, 3), 40 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append(f"face-{i},{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "faces.csv").write_text("\n".join(rows) + "\n")

    raw = open_source("imagefolder", manifest=tmp_path / "faces.csv")

    assert raw.name == "faces" and raw.sample_ids == [f"face-{i}" for i in range(4)]
    assert raw.images.shape == (4, 3, 5, 6) and raw.images[2].max() == 80
    assert raw.labels.tolist() == [1, 0, 1, 0] and raw.num_classes == 2


def test_image_folder_names_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("sample_id,path,label\na,absent.png,0\n")
    with pytest.raises(SourceUnavailable, match=r"absent\.png"):
        open_source("imagefolder", manifest=tmp_path / "m.csv")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")],
)
def test_torchvision_sources_are_never_downloaded(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(SourceUnavailable, match=expected):
        open_source(name, root=tmp_path)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: zero, type 0x08 (uint8), rank, sizes, data."""
    sizes = b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(struct.pack(">HBB", 0, 0x08, array.ndim) + sizes + array.tobytes())


def test_mnist_is_read_from_its_local_files_with_stable_ids(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", 3), ("t10k", 2)):
        images = np.arange(count * 28 * 28, dtype=np.uint8).reshape(count, 28, 28)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8))

    mnist = open_source("mnist", root=tmp_path)

    assert mnist.sample_ids == [
        "mnist-train-00000",
        "mnist-train-00001",
        "mnist-train-00002",
        "mnist-test-00000",
        "mnist-test-00001",
    ]
    assert mnist.images.shape == (5, 1, 28, 28) and mnist.images[1, 0, 0, 0] == 16
    assert mnist.labels.tolist() == [0, 1, 2, 0, 1] and mnist.num_classes == 10
