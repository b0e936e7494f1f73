"""One audit of a candidate version against its parent: load F, H, T, the retained data and
the cached reference models; run every attack; write the report and plots to the store; record
the figures and the gate decision in ``audits``."""

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session
from torch import nn

from app.ledger.audits import create_audit, finish_audit
from app.ledger.tables import ModelVersion, Split
from worker.audit import mia
from worker.audit.config import AuditConfig
from worker.audit.gate import GatePolicy, decide
from worker.audit.inversion import class_inversion, evaluator
from worker.audit.posteriors import logits, scaled_logit
from worker.audit.references import ReferenceSet, reference_set
from worker.audit.report import DEFINITIONS, json_safe, roc_png
from worker.audit.unlearning_inversion import unlearning_inversion
from worker.audit.unlearning_mia import two_version_attacks, two_version_mia
from worker.data import SampleSet, load_samples, load_split
from worker.progress import Step, within
from worker.store import ArtifactStore
from worker.training import Progress, TrainConfig, load_model, model_spec
from worker.unlearning.common import root_run

SETS = ("forget", "heldout", "test", "retained")


@dataclass(frozen=True)
class AuditResult:
    """What the pipeline needs: ``passed`` decides promotion; ``reasons`` say why, per rule."""

    audit_id: int
    version: str
    passed: bool
    decision: str  # "pass" or "fail"
    reasons: list[dict[str, Any]]
    metrics: dict[str, Any]
    report_key: str
    artifacts: dict[str, str]  # artifact name -> store key


class Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def audit_sets(
    session: Session, store: ArtifactStore, dataset: str, forget_ids: Sequence[str]
) -> dict[str, SampleSet]:
    """F (raw data still held: the audit runs before the purge), H, T, the retained train
    samples and the reference pool."""
    forget = load_samples(store, dataset, forget_ids)
    missing = set(forget_ids) - set(forget.sample_ids)
    if missing:
        raise LookupError(f"the audit needs the raw data of {sorted(missing)}, already erased")
    return {
        "forget": forget,
        "heldout": load_split(session, store, dataset, Split.heldout),
        "test": load_split(session, store, dataset, Split.test),
        "retained": load_split(session, store, dataset, Split.train, exclude=forget_ids),
        "pool": load_split(session, store, dataset, Split.pool),
    }


def utility(
    parent: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], sets: dict[str, SampleSet]
) -> dict[str, Any]:
    def accuracy(raw: torch.Tensor, data: SampleSet) -> float | None:
        if len(data) == 0:
            return None
        return float((raw.argmax(dim=1) == data.labels.cpu()).float().mean())

    figures = {}
    for name in ("forget", "retained", "test"):
        before, after = accuracy(parent[name], sets[name]), accuracy(candidate[name], sets[name])
        drop = None if before is None or after is None else 100 * (before - after)
        figures[name] = {"parent": before, "candidate": after, "drop_points": drop}
    return figures


Outputs = dict[str, dict[str, torch.Tensor]]  # role ("parent"/"candidate") -> set -> logits


@dataclass
class AttackRun:
    """What the attacks produce: figures per attack, ROC inputs per plot, images per name."""

    figures: dict[str, Any]
    curves: dict[str, dict[str, mia.AttackOutcome]]
    images: dict[str, bytes]


def membership_attacks(
    references: ReferenceSet,
    outputs: Outputs,
    sets: dict[str, SampleSet],
    policy: GatePolicy,
    config: AuditConfig,
    device: torch.device,
    watch: Stopwatch,
) -> AttackRun:
    candidate = outputs["candidate"]
    with watch("shadow"):
        attacks = mia.shadow_attack_models(references, config, device)
        shadow = mia.shadow_mia(
            attacks, candidate["forget"], sets["forget"], candidate["heldout"], sets["heldout"]
        )
    with watch("calibrated"):
        calibrated = mia.calibrated_mia(candidate, sets, policy.calibrated_fpr)
    with watch("lira"):
        phi = {
            name: scaled_logit(candidate[name], sets[name].labels) for name in ("forget", "heldout")
        }
        reference_phi = mia.reference_statistics(
            references, {name: sets[name] for name in ("forget", "heldout")}, device
        )
        fprs = tuple(sorted({*config.low_fprs, policy.lira_fpr}))
        lira = mia.lira_offline(
            phi["forget"], reference_phi["forget"], phi["heldout"], reference_phi["heldout"], fprs
        )
    with watch("two_version"):
        probabilities = {
            role: {name: outputs[role][name].softmax(dim=1) for name in ("forget", "heldout")}
            for role in outputs
        }
        two_version = two_version_mia(
            two_version_attacks(references, config, device),
            probabilities["parent"],
            probabilities["candidate"],
            policy.calibrated_fpr,
        )
    return AttackRun(
        figures={
            "shadow": shadow.figures,
            "calibrated": calibrated.figures,
            "lira": lira.figures,
            "two_version": {name: outcome.figures for name, outcome in two_version.items()},
        },
        curves={
            "shadow": {"shadow-model MIA": shadow},
            "calibrated": {"calibrated loss": calibrated},
            "lira": {"offline LiRA": lira},
            "two_version": two_version,
        },
        images={},
    )


def inversion_attacks(
    references: ReferenceSet,
    versions: dict[str, ModelVersion],
    models: dict[str, nn.Module],
    outputs: Outputs,
    sets: dict[str, SampleSet],
    config: AuditConfig,
    device: torch.device,
    watch: Stopwatch,
) -> AttackRun:
    forget = sets["forget"]
    channels, height, width = forget.images.shape[1:]
    with watch("unlearning_inversion"):
        probes = {role: outputs[role]["test"].softmax(dim=1) for role in outputs}
        rebuilt = unlearning_inversion(
            models["parent"], models["candidate"], forget, probes, sets["heldout"], config, device
        )
    with watch("class_inversion"):
        classes = class_inversion(
            references.store,
            {role: (models[role], versions[role].weights_sha256) for role in models},
            evaluator(references, device),
            forget.num_classes,
            (channels, height, width),
            set(forget.labels.tolist()),
            config,
            device,
        )
    return AttackRun(
        figures={"unlearning_inversion": rebuilt.figures, "class_inversion": classes.figures},
        curves={},
        images={"unlearning_inversion.png": rebuilt.image, **classes.images},
    )


def write_artifacts(
    store: ArtifactStore,
    prefix: str,
    curves: dict[str, dict[str, mia.AttackOutcome]],
    images: dict[str, bytes],
) -> dict[str, str]:
    """Every attack's ROC in one figure (one figure costs a quarter of four: matplotlib's time
    goes into laying out text), then the images."""
    outcomes = {
        label if len(named) == 1 else f"{attack}: {label}": outcome
        for attack, named in curves.items()
        for label, outcome in named.items()
    }
    files = {"roc.png": roc_png("membership attacks: F vs H", outcomes), **images}
    return {name: store.put_bytes(f"{prefix}/{name}", data).key for name, data in files.items()}


def references_for(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    pool: SampleSet,
    config: AuditConfig,
    device: torch.device,
    progress: Progress | None = None,
) -> ReferenceSet:
    """The reference models of the parent's run configuration (trained now if missing)."""
    return reference_set(
        store,
        parent.details["dataset"],
        model_spec(parent),
        TrainConfig.from_dict(root_run(session, parent).hyperparameters),
        pool,
        config.reference_models,
        config.reference_seed,
        device,
        progress,
    )


def prepare_audits(
    session: Session,
    store: ArtifactStore,
    version: ModelVersion,
    device: torch.device,
    config: AuditConfig = AuditConfig(),
    progress: Progress | None = None,
) -> dict[str, float]:
    """Builds every cached model an audit of ``version``'s children needs (reference models,
    attack models, shadow pairs, evaluator), e.g. right after training, so that the first
    deletion job does not pay for them. Returns the one-off seconds per cached object."""
    pool = load_split(session, store, version.details["dataset"], Split.pool)
    references = references_for(
        session, store, version, pool, config, device, within(progress, 0, 90)
    )
    if progress:
        progress(90, Step("attack models, shadow pairs, evaluator"))
    mia.shadow_attack_models(references, config, device)
    two_version_attacks(references, config, device)
    evaluator(references, device)
    return references.one_off_seconds


def run_audit(
    session: Session,
    store: ArtifactStore,
    candidate: ModelVersion,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    device: torch.device,
    policy: GatePolicy | None = None,
    progress: Progress | None = None,
    *,
    job_id: int | None = None,
    config: AuditConfig = AuditConfig(),
) -> AuditResult:
    """Audits ``candidate`` (``parent`` minus ``forget_ids``) against ``parent``, writes the
    report and plots to the store and records the gate decision in ``audits``. The reference
    models are trained on first use for the run configuration, then reused."""
    policy = policy or GatePolicy()
    report = progress or (lambda *_: None)
    report(0, Step("loading"))
    audit = create_audit(session, candidate.id, job_id)
    watch = Stopwatch()
    dataset = parent.details["dataset"]
    with watch("load"):
        sets = audit_sets(session, store, dataset, forget_ids)
        versions = {"parent": parent, "candidate": candidate}
        models = {role: load_model(store, v, device) for role, v in versions.items()}
        outputs = {
            role: {name: logits(model, sets[name], device) for name in SETS}
            for role, model in models.items()
        }
    with watch("references"):
        references = references_for(
            session,
            store,
            parent,
            sets["pool"],
            config,
            device,
            within(report, 5, 55),
        )
    report(55, Step("membership attacks"))
    membership = membership_attacks(references, outputs, sets, policy, config, device, watch)
    report(70, Step("inversion attacks"))
    inversion = inversion_attacks(
        references, versions, models, outputs, sets, config, device, watch
    )
    report(90, Step("report and plots"))
    prefix = f"audits/{candidate.version}/{audit.id}"
    with watch("report"):
        artifacts = write_artifacts(store, prefix, membership.curves, inversion.images)
    metrics: dict[str, Any] = {
        "sets": {name: len(data) for name, data in sets.items()},
        "utility": utility(outputs["parent"], outputs["candidate"], sets),
        **membership.figures,
        **inversion.figures,
    }
    decision = decide(metrics, policy, candidate.method)
    metrics = json_safe(
        {
            **{name: {"definition": DEFINITIONS[name], **metrics[name]} for name in DEFINITIONS},
            "sets": metrics["sets"],
            "timings": timings(watch, references),
            "config": config.to_dict(),
        }
    )
    document = {
        "version": candidate.version,
        "parent": parent.version,
        "dataset": dataset,
        "decision": decision.decision,
        "thresholds": policy.model_dump(),
        "reasons": decision.reasons,
        "metrics": metrics,
        "artifacts": artifacts,
    }
    report_key = store.put_json(f"{prefix}/report.json", json_safe(document)).key
    finish_audit(
        session,
        audit.id,
        metrics=metrics,
        decision=decision.decision,
        thresholds=json_safe(policy.model_dump()),
        reasons=json_safe(decision.reasons),
        artifacts=artifacts,
        report_key=report_key,
    )
    report(100)
    return AuditResult(
        audit.id,
        candidate.version,
        decision.passed,
        decision.decision,
        decision.reasons,
        metrics,
        report_key,
        artifacts,
    )


def timings(watch: Stopwatch, references: ReferenceSet) -> dict[str, Any]:
    """Seconds per stage; the one-off cost of the cached models (paid by the first audit of a
    run configuration) and which of them this audit had to build."""
    built = set(references.built_now)
    one_off = sum(references.one_off_seconds[name] for name in built)
    total = sum(watch.seconds.values())
    return {
        "stages": watch.seconds,
        "total_seconds": total,
        "per_version_seconds": total - one_off,
        "cache_one_off_seconds": references.one_off_seconds,
        "built_in_this_audit": sorted(built),
    }
