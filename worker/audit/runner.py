"""One audit of a candidate version against its parent: load F, H, T, the retained data and
the cached reference models; run every attack; write the report and plots to the store; record
the figures and the gate decision in ``audits``. A version trained from scratch gets a baseline
audit instead (``run_baseline_audit``): how much it remembers of its training samples, no gate."""

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session
from torch import nn

from app.ledger.audits import create_audit, finish_audit
from app.ledger.provenance import root_run
from app.ledger.samples import sample_ids
from app.ledger.tables import ModelVersion, SampleState, Split
from worker.audit import mia
from worker.audit.config import AuditConfig
from worker.audit.gate import AuditDecision, GatePolicy, decide
from worker.audit.inversion import class_inversion, evaluator
from worker.audit.membership import ModelScores, membership_test, model_scores, rank_p_values
from worker.audit.posteriors import logits, scaled_logit
from worker.audit.probe import ForgetProbe
from worker.audit.references import ReferenceSet, reference_set
from worker.audit.report import DEFINITIONS, json_safe, roc_png
from worker.audit.stats import auc_with_interval, clopper_pearson, paired_accuracy
from worker.audit.unlearning_inversion import positive_control, unlearning_inversion
from worker.audit.unlearning_mia import (
    exact_retrain_changes,
    shadow_pairs,
    two_version_attacks,
    two_version_change,
    two_version_mia,
)
from worker.data import SampleSet, load_samples, load_split
from worker.progress import Progress, Step, within
from worker.store import ArtifactStore
from worker.training import TrainConfig, load_model, model_spec

SETS = ("forget", "heldout", "test", "retained")


@dataclass(frozen=True)
class AuditResult:
    """What the pipeline needs: ``passed`` decides promotion; ``reasons`` say why, per rule."""

    audit_id: int
    version: str
    passed: bool
    decision: AuditDecision
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
        **never_seen_sets(session, store, dataset),
        "retained": load_split(session, store, dataset, Split.train, exclude=forget_ids),
        "pool": load_split(session, store, dataset, Split.pool),
    }


def never_seen_sets(session: Session, store: ArtifactStore, dataset: str) -> dict[str, SampleSet]:
    """H ("heldout"): every held-out and test sample still held. No version and no reference
    model saw them: the null set of the membership tests, and the non-members of the reported
    attacks. T ("test"): the test samples among them, for utility. An erasure that empties one
    split leaves the other; with neither, there is nothing to judge a candidate by."""
    heldout_ids = sample_ids(session, dataset, Split.heldout, SampleState.active)
    test_ids = sample_ids(session, dataset, Split.test, SampleState.active)
    if not heldout_ids and not test_ids:
        raise LookupError(f"{dataset} has no held-out or test sample left to audit against")
    never_seen = load_samples(store, dataset, heldout_ids + test_ids)
    tests = set(test_ids)
    positions = [i for i, sid in enumerate(never_seen.sample_ids) if sid in tests]
    return {"heldout": never_seen, "test": never_seen.select(positions)}


def seeded_subset(data: SampleSet, size: int, seed: int = 0) -> SampleSet:
    """Up to ``size`` samples of ``data``, the same ones every time."""
    if len(data) <= size:
        return data
    chosen = np.random.default_rng(seed).choice(len(data), size, replace=False)
    return data.select(sorted(chosen.tolist()))


def utility(
    parent: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], sets: dict[str, SampleSet]
) -> dict[str, Any]:
    def accuracy(raw: torch.Tensor, data: SampleSet) -> float | None:
        if len(data) == 0:
            return None
        return float((raw.argmax(dim=1) == data.labels.cpu()).float().mean())

    figures: dict[str, Any] = {}
    for name in ("forget", "retained", "test"):
        before, after = accuracy(parent[name], sets[name]), accuracy(candidate[name], sets[name])
        drop = None if before is None or after is None else 100 * (before - after)
        figures[name] = {"parent": before, "candidate": after, "drop_points": drop}

    def correct(raw: dict[str, torch.Tensor]) -> np.ndarray:
        hits: np.ndarray = (raw["heldout"].argmax(dim=1) == sets["heldout"].labels.cpu()).numpy()
        return hits

    figures["paired"] = paired_accuracy(correct(parent), correct(candidate))
    return figures


Outputs = dict[str, dict[str, torch.Tensor]]  # role ("parent"/"candidate") -> set -> logits


@dataclass
class AttackRun:
    """What the attacks produce: figures per attack, ROC inputs per plot, images per name."""

    figures: dict[str, Any]
    curves: dict[str, dict[str, mia.AttackOutcome]]
    images: dict[str, bytes]


def phi_of(raw: dict[str, torch.Tensor], sets: dict[str, SampleSet], name: str) -> np.ndarray:
    """LiRA's scaled logit of one set ("null": the never-seen samples, H)."""
    part = "heldout" if name == "null" else name
    phi: np.ndarray = scaled_logit(raw[part], sets[part].labels).numpy()
    return phi


def scores_of(
    raw: dict[str, torch.Tensor],
    sets: dict[str, SampleSet],
    difficulty: dict[str, np.ndarray],
    parts: tuple[str, ...],
) -> ModelScores:
    """One model's standardised membership scores on ``parts`` ("forget", "null", and
    optionally "retained", scored on the power subset)."""
    source = {"forget": "forget", "null": "null", "retained": "power"}
    phi = {part: phi_of(raw, sets, source[part]) for part in parts}
    return model_scores(phi, {part: difficulty[source[part]] for part in parts})


def reference_difficulty(
    references: ReferenceSet,
    sets: dict[str, SampleSet],
    names: tuple[str, ...],
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Every reference model's scaled logit on the named sets ((R, N) each), and the difficulty
    of each sample: the references' median ("null": the never-seen samples, H)."""
    by_reference = mia.reference_statistics(references, {n: sets[n] for n in names}, device)
    difficulty = {n: by_reference[n].median(dim=0).values.numpy() for n in names}
    difficulty["null"] = difficulty["heldout"]
    return by_reference, difficulty


def membership_attacks(
    references: ReferenceSet,
    outputs: Outputs,
    sets: dict[str, SampleSet],
    policy: GatePolicy,
    config: AuditConfig,
    device: torch.device,
    watch: Stopwatch,
) -> AttackRun:
    candidate, parent = outputs["candidate"], outputs["parent"]
    with watch("per_sample"):
        by_reference, difficulty = reference_difficulty(
            references, sets, ("forget", "heldout", "power"), device
        )
        per_sample = membership_test(
            sets["forget"].sample_ids,
            scores_of(candidate, sets, difficulty, ("forget", "null", "retained")),
            scores_of(parent, sets, difficulty, ("forget", "null")),
            policy.membership_alpha,
            policy.control_alpha,
        )
    with watch("two_version"):
        baseline = exact_retrain_changes(references, shadow_pairs(references, config, device))
        change = {
            part: phi_of(parent, sets, part) - phi_of(candidate, sets, part)
            for part in ("forget", "null")
        }
        two_version = two_version_change(baseline, change["forget"], change["null"])
        probabilities = {
            role: {name: outputs[role][name].softmax(dim=1) for name in ("forget", "heldout")}
            for role in outputs
        }
        learned = two_version_mia(
            two_version_attacks(references, config, device),
            probabilities["parent"],
            probabilities["candidate"],
            config.report_fpr,
        )
    with watch("shadow"):
        attacks = mia.shadow_attack_models(references, config, device)
        shadow = mia.shadow_mia(
            attacks, candidate["forget"], sets["forget"], candidate["heldout"], sets["heldout"]
        )
    with watch("calibrated"):
        calibrated = mia.calibrated_mia(candidate, sets, config.report_fpr)
    with watch("lira"):
        fprs = tuple(sorted({*config.low_fprs, config.report_fpr}))
        lira = mia.lira_offline(
            torch.from_numpy(phi_of(candidate, sets, "forget")),
            by_reference["forget"],
            torch.from_numpy(phi_of(candidate, sets, "heldout")),
            by_reference["heldout"],
            fprs,
        )
    return AttackRun(
        figures={
            "per_sample": per_sample.figures,
            "two_version_change": two_version,
            "shadow": shadow.figures,
            "calibrated": calibrated.figures,
            "lira": lira.figures,
            "two_version": {name: outcome.figures for name, outcome in learned.items()},
        },
        curves={
            "shadow": {"shadow-model MIA": shadow},
            "calibrated": {"calibrated loss": calibrated},
            "lira": {"offline LiRA": lira},
            "two_version": learned,
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
        probes = {role: outputs[role]["heldout"].softmax(dim=1) for role in outputs}
        control = positive_control(
            references.store,
            versions["parent"].weights_sha256,
            models["parent"],
            sets["heldout"],
            config,
            device,
        )
        rebuilt = unlearning_inversion(
            models["parent"],
            models["candidate"],
            forget,
            probes,
            sets["heldout"],
            config,
            device,
            control,
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


def forget_probe(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    device: torch.device,
    config: AuditConfig | None = None,
) -> ForgetProbe:
    """The probe of how member-like ``forget_ids`` look, with the parent's reference models."""
    dataset = parent.details["dataset"]
    pool = load_split(session, store, dataset, Split.pool)
    references = references_for(session, store, parent, pool, config or AuditConfig(), device)
    never_seen = never_seen_sets(session, store, dataset)
    return ForgetProbe(
        references,
        load_samples(store, dataset, forget_ids),
        never_seen["heldout"],
        device,
    )


def prepare_audits(
    session: Session,
    store: ArtifactStore,
    version: ModelVersion,
    device: torch.device,
    config: AuditConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Builds every cached model an audit of ``version``'s children needs (reference models,
    shadow pairs, attack models, evaluator), e.g. right after training, so that the first
    deletion job does not pay for them. Returns the one-off seconds per cached object."""
    config = config or AuditConfig()
    pool = load_split(session, store, version.details["dataset"], Split.pool)
    references = references_for(
        session, store, version, pool, config, device, within(progress, 0, 90)
    )
    if progress:
        progress(90, Step("attack models, shadow pairs, evaluator"))
    shadow_pairs(references, config, device)
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
    config: AuditConfig | None = None,
) -> AuditResult:
    """Audits ``candidate`` (``parent`` minus ``forget_ids``) against ``parent``, writes the
    report and plots to the store and records the gate decision in ``audits``. The reference
    models are trained on first use for the run configuration, then reused."""
    policy, config = policy or GatePolicy(), config or AuditConfig()
    report = progress or (lambda *_: None)
    report(0, Step("loading"))
    audit = create_audit(session, candidate.id, job_id)
    watch = Stopwatch()
    dataset = parent.details["dataset"]
    with watch("load"):
        sets = audit_sets(session, store, dataset, forget_ids)
        sets["power"] = seeded_subset(sets["retained"], config.retained_power_samples)
        versions = {"parent": parent, "candidate": candidate}
        models = {role: load_model(store, v, device) for role, v in versions.items()}
        outputs = {
            role: {name: logits(model, sets[name], device) for name in (*SETS, "power")}
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
    recorded = record_audit(
        session,
        store,
        audit.id,
        prefix,
        {"version": candidate.version, "parent": parent.version, "dataset": dataset},
        metrics,
        {**timings(watch, references), "config": config.model_dump()},
        decision.decision,
        policy,
        decision.reasons,
        artifacts,
    )
    report(100)
    return AuditResult(
        audit.id,
        candidate.version,
        decision.passed,
        decision.decision,
        decision.reasons,
        recorded,
        f"{prefix}/report.json",
        artifacts,
    )


def record_audit(
    session: Session,
    store: ArtifactStore,
    audit_id: int,
    prefix: str,
    heading: dict[str, Any],
    metrics: dict[str, Any],
    cost: dict[str, Any],
    decision: AuditDecision,
    policy: GatePolicy,
    reasons: list[dict[str, Any]],
    artifacts: dict[str, str],
) -> dict[str, Any]:
    """Writes the report to the store and finishes the audit row; returns the recorded metrics
    (each figure with its definition)."""
    recorded: dict[str, Any] = json_safe(
        {
            **{
                name: {"definition": DEFINITIONS[name], **figures}
                for name, figures in metrics.items()
                if name in DEFINITIONS
            },
            "sets": metrics["sets"],
            "timings": cost,
        }
    )
    thresholds = json_safe(policy.model_dump())
    document = {
        **heading,
        "decision": decision.value,
        "thresholds": thresholds,
        "reasons": reasons,
        "metrics": recorded,
        "artifacts": artifacts,
    }
    report_key = store.put_json(f"{prefix}/report.json", json_safe(document)).key
    finish_audit(
        session,
        audit_id,
        metrics=recorded,
        decision=decision.value,
        thresholds=thresholds,
        reasons=json_safe(reasons),
        artifacts=artifacts,
        report_key=report_key,
    )
    return recorded


def run_baseline_audit(
    session: Session,
    store: ArtifactStore,
    version: ModelVersion,
    device: torch.device,
    policy: GatePolicy | None = None,
    *,
    job_id: int | None = None,
    config: AuditConfig | None = None,
) -> AuditResult:
    """The audit of a version trained from scratch: its accuracy on never-seen samples and how
    much it remembers of its training samples, scored as the gate scores an erased sample
    (against the reference models and the never-seen samples). No gate: decision "baseline"."""
    policy, config = policy or GatePolicy(), config or AuditConfig()
    audit = create_audit(session, version.id, job_id)
    watch = Stopwatch()
    dataset = version.details["dataset"]
    with watch("load"):
        sets = never_seen_sets(session, store, dataset)
        train_split = load_split(session, store, dataset, Split.train)
        sets["forget"] = seeded_subset(train_split, config.retained_power_samples)  # members
        model = load_model(store, version, device)
        raw = {name: logits(model, data, device) for name, data in sets.items()}
    with watch("references"):
        pool = load_split(session, store, dataset, Split.pool)
        references = references_for(session, store, version, pool, config, device)
    with watch("per_sample"):
        _, difficulty = reference_difficulty(references, sets, ("forget", "heldout"), device)
        scores = scores_of(raw, sets, difficulty, ("forget", "null"))
        p_leak, _ = rank_p_values(scores.forget, scores.null)
    remembered = clopper_pearson(int((p_leak < policy.control_alpha).sum()), len(p_leak))
    accuracy = {
        name: float((raw[name].argmax(dim=1) == sets[name].labels.cpu()).float().mean())
        for name in ("heldout", "test", "forget")
    }
    member_auc = auc_with_interval(scores.forget, scores.null)
    metrics = {
        "sets": {name: len(data) for name, data in sets.items()},
        "baseline": {
            "accuracy": accuracy,
            "member_auc": member_auc,
            "measurably_remembered": remembered.to_dict(),
        },
    }
    reason = (
        f"trained version: test accuracy {accuracy['test']:.4f}; {remembered.k} of "
        f"{remembered.n} training samples scored are measurably member-like (p < "
        f"{policy.control_alpha:g} against never-seen samples); member AUC "
        f"{member_auc['value']:.3f}. No gate: a trained version is the reference its children "
        "are judged against"
    )
    reasons = [
        {"rule": "baseline", "passed": True, "reason": reason, "value": None, "threshold": None}
    ]
    prefix = f"audits/{version.version}/{audit.id}"
    recorded = record_audit(
        session,
        store,
        audit.id,
        prefix,
        {"version": version.version, "parent": None, "dataset": dataset},
        metrics,
        {**timings(watch, references), "config": config.model_dump()},
        AuditDecision.baseline,
        policy,
        reasons,
        {},
    )
    return AuditResult(
        audit.id,
        version.version,
        True,
        AuditDecision.baseline,
        reasons,
        recorded,
        f"{prefix}/report.json",
        {},
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
