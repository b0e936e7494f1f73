"""Lethe's own copy of each data set, its splits, and the erasure of a sample's raw data.

Sources such as scikit-learn's digits live in files Lethe does not own, so ingest copies every
sample into the artifact store (``datasets/<name>/shards/*.safetensors`` plus a JSON manifest)
and registers it in the ledger with the sha256 of its pixels. Training, audits and unlearning
read only this copy. Erasing a sample rewrites the shards that held it without it and deletes
the old shard objects, so later loads no longer see it. Lethe keeps no other cache of raw data.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from app.ledger.erasure import dataset_manifest_key, dataset_shards_prefix
from app.ledger.samples import SampleRecord, register_samples, sample_ids
from app.ledger.tables import SampleState, Split
from worker.data.sources import RawDataset
from worker.store import ArtifactStore, sha256_hex

SPLIT_FRACTIONS = ((Split.train, 0.5), (Split.heldout, 0.15), (Split.test, 0.15), (Split.pool, 0.2))
SHARD_SIZE = 4096
CPU = torch.device("cpu")


@dataclass(frozen=True)
class SampleSet:
    """Samples held in memory: uint8 images (N, C, H, W) and int64 labels, on one device."""

    sample_ids: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.sample_ids)

    def to(self, device: torch.device) -> "SampleSet":
        return SampleSet(
            self.sample_ids, self.images.to(device), self.labels.to(device), self.num_classes
        )

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Model inputs in [0, 1]."""
        return self.images[index].float().div_(255)

    def plus(self, other: "SampleSet") -> "SampleSet":
        """Both sets, this one first (the same ID may appear twice: a relabelled copy)."""
        return SampleSet(
            self.sample_ids + other.sample_ids,
            torch.cat([self.images, other.images.to(self.images.device)]),
            torch.cat([self.labels, other.labels.to(self.labels.device)]),
            self.num_classes,
        )

    def select(self, positions: Sequence[int]) -> "SampleSet":
        index = torch.as_tensor(list(positions), dtype=torch.long, device=self.images.device)
        return SampleSet(
            [self.sample_ids[i] for i in positions],
            self.images[index],
            self.labels[index],
            self.num_classes,
        )


def assign_splits(ids: Sequence[str], seed: int) -> dict[str, Split]:
    """A seeded permutation of the sorted IDs, cut by SPLIT_FRACTIONS: the same every time."""
    ordered = sorted(ids)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    cuts = np.rint(np.cumsum([fraction for _, fraction in SPLIT_FRACTIONS]) * len(ordered))
    splits: dict[str, Split] = {}
    start = 0
    for (split, _), end in zip(SPLIT_FRACTIONS, cuts.astype(int), strict=True):
        splits.update((ordered[i], split) for i in permutation[start:end])
        start = end
    return splits


def content_sha256(image: np.ndarray) -> str:
    """The sha256 of a sample's pixels: its uint8 (C, H, W) array in C order."""
    return sha256_hex(np.ascontiguousarray(image, dtype=np.uint8).tobytes())


def ingest(session: Session, store: ArtifactStore, raw: RawDataset, seed: int = 0) -> int:
    """Copies the source into the store (once) and registers its samples; returns how many
    samples were new to the ledger. Re-running never brings back an erased sample: once the
    copy exists, only the samples still in it are registered."""
    splits = assign_splits(raw.sample_ids, seed)
    if store.exists(dataset_manifest_key(raw.name)):
        kept = {sid for shard in read_manifest(store, raw.name)["shards"] for sid in shard["ids"]}
    else:
        _write_copy(store, raw)
        kept = set(raw.sample_ids)
    records = (
        SampleRecord(sid, splits[sid], int(label), content_sha256(image))
        for sid, image, label in zip(raw.sample_ids, raw.images, raw.labels, strict=True)
        if sid in kept
    )
    return register_samples(session, raw.name, records)


def _write_copy(store: ArtifactStore, raw: RawDataset) -> None:
    shards = []
    for number, start in enumerate(range(0, len(raw.sample_ids), SHARD_SIZE)):
        rows = slice(start, start + SHARD_SIZE)
        shards.append(
            _write_shard(
                store,
                raw.name,
                number,
                0,
                raw.sample_ids[rows],
                torch.from_numpy(raw.images[rows]),
                torch.from_numpy(raw.labels[rows]),
            )
        )
    store.put_json(
        dataset_manifest_key(raw.name),
        {"dataset": raw.name, "num_classes": raw.num_classes, "shards": shards},
    )


def _write_shard(
    store: ArtifactStore,
    dataset: str,
    number: int,
    generation: int,
    ids: list[str],
    images: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, Any]:
    # A rewritten shard gets a new key, so the manifest never names a half-written object.
    key = f"{dataset_shards_prefix(dataset)}/{number:05d}.g{generation}.safetensors"
    stored = store.put_tensors(key, {"images": images, "labels": labels})
    return {
        "key": key,
        "sha256": stored.sha256,
        "number": number,
        "generation": generation,
        "ids": ids,
    }


def read_manifest(store: ArtifactStore, dataset: str) -> dict[str, Any]:
    manifest: dict[str, Any] = store.get_json(dataset_manifest_key(dataset))
    return manifest


def load_samples(
    store: ArtifactStore, dataset: str, wanted: Sequence[str] | None = None
) -> SampleSet:
    """The wanted samples (all when None) in the order asked; erased ones are skipped."""
    manifest = read_manifest(store, dataset)
    wanted_set = None if wanted is None else set(wanted)
    ids: list[str] = []
    images, labels = [], []
    for shard in manifest["shards"]:
        rows = [i for i, sid in enumerate(shard["ids"]) if wanted_set is None or sid in wanted_set]
        if not rows:
            continue
        tensors = store.get_tensors(shard["key"], CPU, expected_sha256=shard["sha256"])
        index = torch.as_tensor(rows, dtype=torch.long)
        ids.extend(shard["ids"][i] for i in rows)
        images.append(tensors["images"][index])
        labels.append(tensors["labels"][index])
    if not ids:
        raise LookupError(f"none of the requested samples of {dataset!r} is in the store")
    loaded = SampleSet(ids, torch.cat(images), torch.cat(labels), manifest["num_classes"])
    if wanted is None:
        return loaded
    position = {sid: i for i, sid in enumerate(ids)}
    return loaded.select([position[sid] for sid in wanted if sid in position])


def load_split(
    session: Session,
    store: ArtifactStore,
    dataset: str,
    split: Split,
    exclude: Iterable[str] = (),
) -> SampleSet:
    """The split's samples that are still active in the ledger, minus ``exclude``."""
    excluded = set(exclude)
    active = sample_ids(session, dataset, split, SampleState.active)
    return load_samples(store, dataset, [sid for sid in active if sid not in excluded])


def erase_samples(
    store: ArtifactStore, dataset: str, erased: Sequence[str]
) -> list[dict[str, Any]]:
    """Removes the samples' raw data from Lethe's copy: each shard holding one is rewritten
    without it and the old object deleted. Returns, per rewritten shard, the old and new keys
    and hashes. Idempotent; a re-run also deletes shard objects a crashed run left behind."""
    manifest = read_manifest(store, dataset)
    gone = set(erased)
    receipts = []
    shards = []
    for shard in manifest["shards"]:
        keep = [i for i, sid in enumerate(shard["ids"]) if sid not in gone]
        if len(keep) == len(shard["ids"]):
            shards.append(shard)
            continue
        receipt = {"old_key": shard["key"], "old_sha256": shard["sha256"], "new_key": None}
        receipt["erased"] = [sid for sid in shard["ids"] if sid in gone]
        if keep:
            replacement = _rewrite_shard(store, dataset, shard, keep)
            receipt.update(new_key=replacement["key"], new_sha256=replacement["sha256"])
            shards.append(replacement)
        receipts.append(receipt)
    if receipts:
        store.put_json(dataset_manifest_key(dataset), {**manifest, "shards": shards})
    _delete_unlisted_shards(store, dataset, {shard["key"] for shard in shards})
    return receipts


def _rewrite_shard(
    store: ArtifactStore, dataset: str, shard: dict[str, Any], keep: list[int]
) -> dict[str, Any]:
    tensors = store.get_tensors(shard["key"], CPU, expected_sha256=shard["sha256"])
    index = torch.as_tensor(keep, dtype=torch.long)
    return _write_shard(
        store,
        dataset,
        shard["number"],
        shard["generation"] + 1,
        [shard["ids"][i] for i in keep],
        tensors["images"][index],
        tensors["labels"][index],
    )


def _delete_unlisted_shards(store: ArtifactStore, dataset: str, listed: set[str]) -> None:
    for key in store.list(dataset_shards_prefix(dataset)):
        if key not in listed:
            store.delete(key)
