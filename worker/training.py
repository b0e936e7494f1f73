"""The training loop, with or without provenance, and the model versions it produces.

``train`` is the plain loop (audits reuse it for shadow and reference models). Given a
``ProvenanceRecorder`` it also records, for every step, the batch's sample IDs in the ledger and
the change of every floating-point state_dict entry in the artifact store. Deltas are computed
and written by background threads and ledger rows are inserted once per epoch, so that
recording costs little more than the training itself.
"""

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from sqlalchemy.orm import Session
from torch import nn

from app.ledger.provenance import DeltaRecord, create_run, finish_run, record_steps
from app.ledger.tables import Method, ModelVersion, Split, VersionState
from app.ledger.versions import alias_target, create_version, promote
from worker.data import SampleSet, load_split
from worker.nets import ModelSpec, build_model, tracked_entries
from worker.progress import Progress, Step
from worker.store import ArtifactStore, Layout, host_view, safetensors_header

DELTA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adam"  # "adam" or "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None  # stop early: repair and relabel runs count steps, not epochs
    delta_dtype: str = "fp32"  # "fp32" or "bf16"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def total_steps(self, num_samples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return batches_per_epoch(num_samples, self.batch_size) * self.epochs


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """A remainder of less than half a batch joins the last full batch (see ``epoch_batches``)."""
    full, remainder = divmod(num_samples, batch_size)
    return max(1, full + (remainder * 2 >= batch_size))


def epoch_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """One epoch's batches, in ``order``. A remainder of less than half a batch joins the last
    full batch instead of being a step of its own: a step on 2 samples (898 digits in batches of
    64) updates BatchNorm's running statistics from 2 samples, and 3 of 12 seeds of the default
    run ended near 87% test accuracy instead of 99%."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) * 2 < batch_size:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@dataclass(frozen=True)
class TrainResult:
    steps: int
    last_loss: float


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; known: sgd, adam")


class ProgressReporter:
    """Calls back with a whole percentage and the count of ``unit`` done, only when the
    percentage changes."""

    def __init__(self, callback: Progress | None, total: int, unit: str = "steps") -> None:
        self.callback, self.total, self.last = callback, max(total, 1), -1
        self.unit = unit

    def update(self, done: int) -> None:
        percent = min(100, done * 100 // self.total)
        if self.callback is not None and percent != self.last:
            self.last = percent
            self.callback(percent, Step(done=done, total=self.total, unit=self.unit))


class DeltaTracker:
    """Keeps a flat copy of the tracked entries on their device. ``advance`` returns the flat
    states before and after the step just taken, in ``layout`` order: one copy in the training
    loop, the subtraction is left to the writer threads."""

    def __init__(self, model: nn.Module) -> None:
        entries = tracked_entries(model)
        self.current = [entries[name].detach() for name in sorted(entries)]
        self.layout: Layout = [(name, list(entries[name].shape)) for name in sorted(entries)]
        self.before = self.flatten()

    def flatten(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in self.current])

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        before, self.before = self.before, self.flatten()
        return before, self.before


def delta_key(run_id: int, step: int) -> str:
    return f"runs/{run_id}/deltas/{step:07d}.safetensors"


class ProvenanceRecorder:
    """Computes and writes each step's delta in ``writers`` background threads (hashing and
    file writes release the GIL) and inserts the ledger rows (membership and delta metadata)
    from the caller's thread, in chunks. At most ``max_pending`` steps wait in memory; beyond
    that the loop waits for the writers."""

    def __init__(
        self,
        session: Session,
        store: ArtifactStore,
        run_id: int,
        delta_dtype: str = "fp32",
        max_pending: int = 8,
        writers: int = 2,
    ) -> None:
        self.session, self.store, self.run_id = session, store, run_id
        self.dtype = DELTA_DTYPES[delta_dtype]
        self.dtype_name = delta_dtype
        self.max_pending = max_pending
        self.writer = ThreadPoolExecutor(writers, thread_name_prefix="lethe-deltas")
        self.pending: deque[tuple[int, list[str], Future[DeltaRecord]]] = deque()
        self.done: list[tuple[int, list[str], DeltaRecord]] = []
        self.delta_bytes = 0

    def watch(self, model: nn.Module) -> None:
        """Starts tracking the model: call before its first recorded step."""
        self.tracker = DeltaTracker(model)
        self.header = safetensors_header(self.tracker.layout, self.dtype)
        self.entries = [name for name, _ in self.tracker.layout]

    def record(self, step: int, sample_ids: list[str]) -> None:
        """Records the step just taken: its batch and the change it made."""
        states = self.tracker.advance()
        self.pending.append((step, sample_ids, self.writer.submit(self._write, step, *states)))
        while len(self.pending) > self.max_pending:
            self._collect_oldest()

    def _write(self, step: int, before: torch.Tensor, after: torch.Tensor) -> DeltaRecord:
        delta = (after - before).to(self.dtype)
        key = delta_key(self.run_id, step)
        stored = self.store.put_parts(key, [self.header, host_view(delta)])
        return DeltaRecord(
            step, stored.key, stored.sha256, self.dtype_name, stored.num_bytes, self.entries
        )

    def _collect_oldest(self) -> None:
        step, sample_ids, future = self.pending.popleft()
        self.done.append((step, sample_ids, future.result()))

    def flush(self) -> None:
        """Inserts the rows of every step whose delta is written (call once per epoch)."""
        while self.pending and self.pending[0][2].done():
            self._collect_oldest()
        if not self.done:
            return
        record_steps(
            self.session,
            self.run_id,
            [(step, ids) for step, ids, _ in self.done],
            [record for _, _, record in self.done],
        )
        self.delta_bytes += sum(record.num_bytes for _, _, record in self.done)
        self.done.clear()

    def abandon(self) -> None:
        """Stops the writer after a failure; the caller's transaction drops the rows."""
        self.writer.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Waits for every write, then records the rest."""
        while self.pending:
            self._collect_oldest()
        self.flush()
        self.writer.shutdown()


def optimisation_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: SampleSet, index: torch.Tensor
) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(data.inputs(index)), data.labels[index])
    loss.backward()
    optimizer.step()
    return loss.detach()


def train(
    model: nn.Module,
    data: SampleSet,
    config: TrainConfig,
    device: torch.device,
    *,
    recorder: ProvenanceRecorder | None = None,
    progress: Progress | None = None,
    stop: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Trains ``model`` in place on ``data`` with cross-entropy; the data order is seeded.
    ``stop``, if given, is asked after every step (with the number of steps taken) whether to end
    there."""
    if len(data) == 0:
        raise ValueError("nothing to train on: the data set is empty")
    model.to(device).train()
    data = data.to(device)
    optimizer = make_optimizer(model, config)
    order = torch.Generator().manual_seed(config.seed)
    total = config.total_steps(len(data))
    reporter = ProgressReporter(progress, total)
    if recorder:
        recorder.watch(model)
    step, loss = 0, torch.tensor(math.nan)
    try:
        while step < total:
            for batch in epoch_batches(
                torch.randperm(len(data), generator=order), config.batch_size
            ):
                if step == total:
                    break
                loss = optimisation_step(model, optimizer, data, batch.to(device))
                if recorder:
                    recorder.record(step, [data.sample_ids[i] for i in batch.tolist()])
                step += 1
                reporter.update(step)
                if stop is not None and stop(step):
                    total = step
            if recorder:
                recorder.flush()
    except BaseException:
        if recorder:
            recorder.abandon()
        raise
    if recorder:
        recorder.close()
    return TrainResult(step, float(loss))


@dataclass(frozen=True)
class RecordedRun:
    run_id: int
    steps: int
    delta_bytes: int


def train_recorded(
    session: Session,
    store: ArtifactStore,
    model: nn.Module,
    data: SampleSet,
    config: TrainConfig,
    device: torch.device,
    *,
    kind: str,
    dataset: str,
    spec: ModelSpec,
    base_version_id: int | None = None,
    progress: Progress | None = None,
    stop: Callable[[int], bool] | None = None,
) -> RecordedRun:
    """``train`` inside a new training run of the ledger, every step recorded."""
    run = create_run(
        session,
        kind=kind,
        dataset=dataset,
        architecture=spec.architecture,
        hyperparameters=config.to_dict(),
        seed=config.seed,
        store_prefix="",
        base_version_id=base_version_id,
    )
    run.store_prefix = f"runs/{run.id}"
    recorder = ProvenanceRecorder(session, store, run.id, config.delta_dtype)
    result = train(model, data, config, device, recorder=recorder, progress=progress, stop=stop)
    finish_run(session, run.id, result.steps)
    return RecordedRun(run.id, result.steps, recorder.delta_bytes)


@torch.no_grad()
def predict(
    model: nn.Module, data: SampleSet, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Predicted labels, on the CPU."""
    model.to(device).eval()
    data = data.to(device)
    chunks = [
        model(data.inputs(slice(start, start + batch_size))).argmax(dim=1).cpu()
        for start in range(0, len(data), batch_size)
    ]
    return torch.cat(chunks)


def accuracy(model: nn.Module, data: SampleSet, device: torch.device) -> float:
    return float((predict(model, data, device) == data.labels.cpu()).float().mean())


def version_key(version: str) -> str:
    return f"versions/{version}.safetensors"


def new_version(
    session: Session,
    spec: ModelSpec,
    *,
    method: str,
    state: VersionState,
    parent_id: int | None = None,
    run_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> ModelVersion:
    return create_version(
        session,
        method=method,
        state=state,
        parent_id=parent_id,
        run_id=run_id,
        details={"model": spec.to_dict(), **(details or {})},
    )


def store_weights(store: ArtifactStore, version: ModelVersion, model: nn.Module) -> None:
    stored = store.put_tensors(version_key(version.version), model.state_dict())
    version.weights_key, version.weights_sha256 = stored.key, stored.sha256


def model_spec(version: ModelVersion) -> ModelSpec:
    return ModelSpec(**version.details["model"])


def load_model(store: ArtifactStore, version: ModelVersion, device: torch.device) -> nn.Module:
    """The version's network with its stored weights (sha256 verified)."""
    if version.weights_key is None:
        raise LookupError(f"version {version.version} has no stored weights")
    model = build_model(model_spec(version))
    weights = store.get_tensors(version.weights_key, device, version.weights_sha256)
    model.load_state_dict(weights)
    return model.to(device)


def train_first_version(
    session: Session,
    store: ArtifactStore,
    dataset: str,
    architecture: str,
    config: TrainConfig,
    device: torch.device,
    progress: Progress | None = None,
) -> ModelVersion:
    """Trains from scratch on the active train split with provenance and records the version;
    it starts serving when nothing serves yet, and stays a candidate otherwise."""
    data = load_split(session, store, dataset, Split.train)
    spec = ModelSpec(architecture, int(data.images.shape[1]), data.num_classes)
    model = build_model(spec, seed=config.seed)
    run = train_recorded(
        session,
        store,
        model,
        data,
        config,
        device,
        kind="train",
        dataset=dataset,
        spec=spec,
        progress=progress,
    )
    test = load_split(session, store, dataset, Split.test)
    version = new_version(
        session,
        spec,
        method=Method.train,
        state=VersionState.candidate,
        run_id=run.run_id,
        details={"dataset": dataset, "test_accuracy": accuracy(model, test, device)},
    )
    store_weights(store, version, model)
    if alias_target(session) is None:
        promote(session, version, moved_by="lethe train", reason="first trained version")
    return version
