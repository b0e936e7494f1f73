"""The cached model sets an audit compares a version with, trained once per run configuration
(data set, architecture, training settings, pool, count, seed) and reused for every version.

- Reference models: each trained like the target on a seeded random half of the disjoint pool.
  They serve as Shokri/Graves shadow models (the other half is their "out" data) and as
  offline-LiRA reference models: none of them ever saw a train-split sample, so all are OUT
  for any forget set.
- Shadow pairs (Chen et al.): for the first ``pair_shadows`` references, twins retrained
  exactly (same seed and settings) without one of their members. Exact retraining is our
  documented stand-in for "the same method": it needs no ledger and is what Chen et al. do.
- The evaluator for class model inversion: trained on the whole pool, so it shares no sample
  with the target's training data.

Everything lives under ``audits/references/<hash of the configuration>/``; each cached object
has a JSON sidecar with the seconds it took to build, which the report shows as one-off cost.
The folder's manifest names the pool it was built from: erasing a pool sample purges the folder
(it is in the sample's erasure closure, ``app.ledger.erasure``) and the next audit builds a new
one without it.
"""

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from app.ledger.erasure import REFERENCES_PREFIX
from worker.data import SampleSet
from worker.nets import ModelSpec, build_model
from worker.progress import Progress, Step
from worker.store import ArtifactStore
from worker.training import TrainConfig, train

Tensors = dict[str, torch.Tensor]


@dataclass
class ReferenceSet:
    store: ArtifactStore
    prefix: str
    spec: ModelSpec
    config: TrainConfig  # the target's training settings, which every cached model reuses
    pool: SampleSet
    members: list[list[int]]  # per reference model, the pool positions it trained on
    seed: int
    one_off_seconds: dict[str, float] = field(default_factory=dict)
    built_now: list[str] = field(default_factory=list)

    def model(self, name: str, device: torch.device) -> nn.Module:
        model = build_model(self.spec)
        model.load_state_dict(self.store.get_tensors(f"{self.prefix}/{name}.safetensors", device))
        return model.to(device).eval()

    def reference(self, index: int, device: torch.device) -> nn.Module:
        return self.model(f"reference-{index:03d}", device)

    def cached(self, name: str, build: Callable[[], Tensors]) -> Tensors:
        """The named tensors, built (and timed) on first use, then read from the store."""
        key = f"{self.prefix}/{name}.safetensors"
        timing_key = f"{self.prefix}/{name}.json"  # written last: a crashed build is redone
        if not self.store.exists(timing_key):
            started = time.perf_counter()
            tensors = build()
            self.store.put_tensors(key, tensors)
            self.store.put_json(timing_key, {"seconds": time.perf_counter() - started})
            self.built_now.append(name)
        self.one_off_seconds[name] = self.store.get_json(timing_key)["seconds"]
        return self.store.get_tensors(key, torch.device("cpu"))


def configuration_key(
    dataset: str, spec: ModelSpec, config: TrainConfig, pool: SampleSet, count: int, seed: int
) -> str:
    described = {
        "dataset": dataset,
        "model": spec.to_dict(),
        "train": {**config.to_dict(), "seed": None},  # reference models have seeds of their own
        "pool": hashlib.sha256("\n".join(sorted(pool.sample_ids)).encode()).hexdigest(),
        "count": count,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def random_half(pool: SampleSet, seed: int) -> list[int]:
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return sorted(order[: len(pool) // 2].tolist())


def train_model(
    spec: ModelSpec, data: SampleSet, config: TrainConfig, seed: int, device: torch.device
) -> Tensors:
    model = build_model(spec, seed=seed)
    train(model, data, replace(config, seed=seed, max_steps=None), device)
    return dict(model.state_dict())


def reference_set(
    store: ArtifactStore,
    dataset: str,
    spec: ModelSpec,
    config: TrainConfig,
    pool: SampleSet,
    count: int,
    seed: int,
    device: torch.device,
    progress: Progress | None = None,
) -> ReferenceSet:
    """The cached reference models for this configuration, trained now if missing."""
    prefix = f"{REFERENCES_PREFIX}/{configuration_key(dataset, spec, config, pool, count, seed)}"
    halves = [random_half(pool, seed + i) for i in range(count)]
    manifest = f"{prefix}/manifest.json"
    if not store.exists(manifest):  # before any model, so that a purge finds a half-built folder
        members = [[pool.sample_ids[j] for j in half] for half in halves]
        store.put_json(manifest, {"pool": pool.sample_ids, "members": members, "count": count})
    references = ReferenceSet(store, prefix, spec, config, pool, halves, seed)
    for i, half in enumerate(halves):
        if progress:
            progress(i * 100 // count, Step("reference models", i, count, "models"))
        references.cached(
            f"reference-{i:03d}",
            partial(train_model, spec, pool.select(half), config, seed + i, device),
        )
    if progress:
        progress(100, Step("reference models", count, count, "models"))
    return references
