"""The erasure closure: every artifact derived from a sample, defined from the ledger (plus the
store's listings of the folders whose manifests name samples). docs/erasure.md explains it.

For a sample s erased by a request that version C completed (C: the version certified free of
s; none when no model needed unlearning):

- raw data: the dataset shards that list s, and any shard object the manifest does not list;
- step deltas: every step whose batch held s, in every run; every step of a run that trained to
  forget s (relabel: it trains on s's wrong-label copies, and it starts from the holder's weights
  unchanged, so the served weights minus its deltas are the holder's); every step of a run
  tainted by s (it held s, or it started from a version that held s) that no kept version's
  weights are made of (e.g. the first run once exact retraining has replaced it). What amnesiac
  rollback leaves by design stays: the later steps of a kept version's runs, only indirectly
  influenced by s;
- weights: every version whose weight lineage (back to its last from-scratch run) holds a step
  with s, except C and its descendants;
- model caches: the class inversions cached by those versions' weights digests;
- audit images that picture s (the unlearning inversion of every audit whose forget set held s);
- audit models: every cached reference folder whose pool held s.
"""

import enum
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ledger.audits import DONE
from app.ledger.provenance import StepRef, step_deltas, steps_of_samples
from app.ledger.tables import Audit, ModelVersion, PurgedArtifact, Sample, StepDelta, TrainingRun

# Audit artifacts that picture the erased samples (rebuilt from two versions' difference).
SAMPLE_IMAGES = ("unlearning_inversion.png",)
REFERENCES_PREFIX = "audits/references"
CLASS_INVERSIONS_PREFIX = "audits/class-inversions"


def class_inversions_key(weights_sha256: str, settings: str) -> str:
    """Where the class inversions of the weights with this digest are cached."""
    return f"{CLASS_INVERSIONS_PREFIX}/{weights_sha256}-{settings}.safetensors"


def dataset_manifest_key(dataset: str) -> str:
    return f"datasets/{dataset}/manifest.json"


def dataset_shards_prefix(dataset: str) -> str:
    return f"datasets/{dataset}/shards"


class Kind(enum.StrEnum):
    raw_data = "raw-data"
    step_deltas = "step-deltas"
    weights = "weights"
    model_cache = "model-caches"
    audit_image = "audit-images"
    audit_model = "audit-models"


class StoreListing(Protocol):
    def list(self, prefix: str) -> list[str]: ...

    def get_json(self, key: str) -> Any: ...


@dataclass(frozen=True)
class Derived:
    """One object derived from the sample: where it is (or was) and why it counts."""

    kind: Kind
    key: str
    reason: str
    sha256: str | None = None  # as the ledger or a manifest recorded it
    version: str | None = None


@dataclass
class Closure:
    sample_id: str
    dataset: str
    objects: list[Derived] = field(default_factory=list)
    deltas: dict[int, list[StepDelta]] = field(default_factory=dict)  # run -> rows, by step
    delta_reasons: dict[int, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return [o.key for o in self.objects] + [
            row.store_key for rows in self.deltas.values() for row in rows
        ]


class ErasureGraph:
    """The ledger's versions and runs, read once for the closures of a job's samples."""

    def __init__(self, session: Session, store: StoreListing) -> None:
        self.session, self.store = session, store
        self.versions = list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
        self.by_id = {v.id: v for v in self.versions}
        self.runs = {r.id: r for r in session.scalars(select(TrainingRun))}
        self.weight_runs = {v.id: self._weight_runs(v) for v in self.versions}
        self._listings: dict[str, list[str]] = {}
        self._manifests: dict[str, dict[str, Any]] = {}
        self._whole_runs: dict[int, list[StepDelta]] = {}

    def _weight_runs(self, version: ModelVersion) -> set[int]:
        """The runs the version's weights are made of: back to its last from-scratch run."""
        runs: set[int] = set()
        current: ModelVersion | None = version
        while current is not None:
            if current.run_id is not None:
                runs.add(current.run_id)
                if self.runs[current.run_id].base_version_id is None:
                    break
            current = self.by_id.get(current.parent_id) if current.parent_id else None
        return runs

    def _listing(self, prefix: str) -> list[str]:
        if prefix not in self._listings:
            self._listings[prefix] = self.store.list(prefix)
        return self._listings[prefix]

    def cleared_by(self, version_id: int | None) -> set[int]:
        """The version certified free of the sample, and its descendants."""
        cleared = {version_id} if version_id is not None else set()
        for version in self.versions:  # by id: a parent comes before its children
            if version.parent_id in cleared:
                cleared.add(version.id)
        return cleared

    def holders(self, sample_runs: set[int], cleared: set[int]) -> list[ModelVersion]:
        """Versions whose weights were made from a step with the sample, not since cleared."""
        return [
            v for v in self.versions if v.id not in cleared and self.weight_runs[v.id] & sample_runs
        ]

    def closure(
        self,
        sample: Sample,
        cleared_version_id: int | None,
        retained_versions: Iterable[int] = (),
    ) -> Closure:
        """Everything derived from the sample. ``retained_versions``: holders whose weights are
        kept anyway (a legal hold): their runs then stay too."""
        found = Closure(sample.sample_id, sample.dataset)
        steps = steps_of_samples(self.session, [sample.sample_id])[sample.sample_id]
        sample_runs = {run for run, _ in steps}
        holders = self.holders(sample_runs, self.cleared_by(cleared_version_id))
        self._weights(found, holders)
        self._deltas(found, steps, holders, set(retained_versions))
        self._model_caches(found, holders)
        self._audit_images(found)
        self._audit_models(found)
        self._raw_data(found)
        return found

    def _weights(self, found: Closure, holders: list[ModelVersion]) -> None:
        for version in holders:
            if version.weights_key is not None:
                found.objects.append(
                    Derived(
                        Kind.weights,
                        version.weights_key,
                        "trained on the sample and not cleared of it",
                        version.weights_sha256,
                        version.version,
                    )
                )

    def _deltas(
        self,
        found: Closure,
        steps: list[StepRef],
        holders: list[ModelVersion],
        retained: set[int],
    ) -> None:
        sample_runs = {run for run, _ in steps}
        holder_ids = {v.id for v in holders}
        whole: dict[int, str] = {}
        for version in self.versions:
            if version.run_id is None or found.sample_id not in version.details.get("forget", []):
                continue
            run = self.runs[version.run_id]
            # Fine-tuned from a holder's weights as they were (relabel; no rollback first): the
            # version's weights minus this run's deltas are the holder's, whatever its batches
            # held. A repair starts from the rolled-back weights; exact retraining from none.
            from_holder = run.base_version_id in holder_ids and not version.details.get(
                "rolled_back_steps"
            )
            if version.run_id in sample_runs or from_holder:
                whole[version.run_id] = f"trained to forget the sample ({version.method})"
        kept = {
            v.id
            for v in self.versions
            if v.weights_key
            and v.weights_purged_at is None
            and (v.id not in holder_ids or v.id in retained)
        }
        kept_runs = set().union(*(self.weight_runs[v] for v in kept))
        for run in self.runs.values():
            tainted = run.id in sample_runs or run.base_version_id in holder_ids
            if tainted and run.id not in kept_runs:
                whole.setdefault(run.id, "no kept version is made of this run, which held it")
        rows = step_deltas(self.session, [ref for ref in steps if ref[0] not in whole])
        rows += [row for run in sorted(whole) for row in self._run_deltas(run)]
        for row in rows:
            found.deltas.setdefault(row.run_id, []).append(row)
        for run_id in found.deltas:
            found.delta_reasons[run_id] = whole.get(run_id, "the step's batch held the sample")

    def _run_deltas(self, run_id: int) -> list[StepDelta]:
        """Every delta of the run, read once for all the samples of a job."""
        if run_id not in self._whole_runs:
            self._whole_runs[run_id] = _all_deltas(self.session, run_id)
        return self._whole_runs[run_id]

    def _model_caches(self, found: Closure, holders: list[ModelVersion]) -> None:
        cached = self._listing(CLASS_INVERSIONS_PREFIX)
        for version in holders:
            if version.weights_sha256:
                prefix = f"{CLASS_INVERSIONS_PREFIX}/{version.weights_sha256}-"
                found.objects.extend(
                    Derived(
                        Kind.model_cache,
                        key,
                        "class inversions of weights that held the sample",
                        version=version.version,
                    )
                    for key in cached
                    if key.startswith(prefix)
                )

    def _audit_images(self, found: Closure) -> None:
        forgetting = [v.id for v in self.versions if found.sample_id in v.details.get("forget", [])]
        if not forgetting:
            return
        audits = self.session.scalars(
            select(Audit).where(Audit.version_id.in_(forgetting), Audit.state == DONE)
        )
        for audit in audits:
            for name in SAMPLE_IMAGES:
                if name in audit.artifacts:
                    found.objects.append(
                        Derived(
                            Kind.audit_image,
                            audit.artifacts[name],
                            "pictures reconstructions of the forget set",
                            version=self.by_id[audit.version_id].version,
                        )
                    )

    def _audit_models(self, found: Closure) -> None:
        keys = self._listing(REFERENCES_PREFIX)
        for manifest in (k for k in keys if k.endswith("/manifest.json")):
            if found.sample_id in self._manifest(manifest).get("pool", []):
                folder = manifest.removesuffix("manifest.json")
                found.objects.extend(
                    Derived(Kind.audit_model, key, "trained on a pool that held the sample")
                    for key in keys
                    if key.startswith(folder)
                )

    def _manifest(self, key: str) -> dict[str, Any]:
        if key not in self._manifests:
            self._manifests[key] = self.store.get_json(key)
        return self._manifests[key]

    def _raw_data(self, found: Closure) -> None:
        manifest_key = dataset_manifest_key(found.dataset)
        if manifest_key not in self._listing(f"datasets/{found.dataset}"):
            return
        shards = self._manifest(manifest_key)["shards"]
        for shard in shards:
            if found.sample_id in shard["ids"]:
                found.objects.append(
                    Derived(Kind.raw_data, shard["key"], "a shard that holds it", shard["sha256"])
                )
        listed = {shard["key"] for shard in shards}
        for key in self._listing(dataset_shards_prefix(found.dataset)):
            if key not in listed:
                found.objects.append(
                    Derived(Kind.raw_data, key, "a shard object the manifest no longer lists")
                )


def _all_deltas(session: Session, run_id: int) -> list[StepDelta]:
    return list(
        session.scalars(
            select(StepDelta)
            .where(StepDelta.run_id == run_id)
            .order_by(StepDelta.step)
            .execution_options(populate_existing=True)  # purge marks are bulk updates
        )
    )


def step_ranges(steps: Iterable[int]) -> list[list[int]]:
    """Sorted steps as inclusive [first, last] ranges: a whole run is one pair."""
    ranges: list[list[int]] = []
    for step in sorted(set(steps)):
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    return ranges


def digest_of_digests(rows: Sequence[StepDelta]) -> str:
    """One digest for a set of deltas: sha256 over "step:sha256" lines, by step."""
    lines = "".join(f"{row.step}:{row.sha256}\n" for row in sorted(rows, key=lambda r: r.step))
    return hashlib.sha256(lines.encode()).hexdigest()


def deltas_in_ranges(
    session: Session, run_id: int, ranges: Sequence[Sequence[int]]
) -> list[StepDelta]:
    rows: list[StepDelta] = []
    for first, last in ranges:
        rows.extend(
            session.scalars(
                select(StepDelta)
                .where(StepDelta.run_id == run_id, StepDelta.step.between(first, last))
                .order_by(StepDelta.step)
                .execution_options(populate_existing=True)
            )
        )
    return rows


def purged_rows(
    session: Session, *, job_id: int | None = None, keys: Sequence[str] = ()
) -> list[PurgedArtifact]:
    """The purge records of a job, or of the given keys (oldest first)."""
    query = select(PurgedArtifact).order_by(PurgedArtifact.id)
    if job_id is not None:
        query = query.where(PurgedArtifact.job_id == job_id)
    if keys:
        query = query.where(PurgedArtifact.key.in_(list(keys)))
    return list(session.scalars(query))
