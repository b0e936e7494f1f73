"""Amnesiac rollback (Graves et al. 2021): subtract the recorded updates of every step that
touched the forget set, then optionally repair with a short fine-tune on the retained data.

Invariant 2: a step is subtracted at most once per lineage. The steps already subtracted by the
parent's lineage are left out, and the new version claims its steps with compare-and-set
(``mark_rolled_back``) before touching any weight, so a duplicate or concurrent job fails
instead of subtracting twice.
"""

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session
from torch import nn

from app.ledger.provenance import (
    StepRef,
    lineage_runs,
    mark_deltas_purged,
    mark_rolled_back,
    rolled_back_steps,
    step_deltas,
    steps_of_samples,
    weight_lineage,
)
from app.ledger.tables import Method, ModelVersion, StepDelta, VersionState
from worker.nets import tracked_entries
from worker.progress import Progress, within
from worker.store import ArtifactStore
from worker.training import (
    ProgressReporter,
    load_model,
    model_spec,
    new_version,
)
from worker.unlearning.common import (
    continued_config,
    fine_tune_candidate,
    finish_candidate,
    retained_train_set,
)

CPU = torch.device("cpu")


@dataclass(frozen=True)
class RollbackPlan:
    steps: list[StepRef]  # to subtract now
    already_rolled_back: list[StepRef]  # touched the forget set, subtracted by an ancestor
    total_steps: int  # steps recorded in the lineage's runs
    dataset: str
    purged: list[StepRef]  # to subtract, but an erasure deleted their deltas: no rollback

    @property
    def share(self) -> float:
        return len(self.steps) / self.total_steps if self.total_steps else 0.0

    @property
    def blocked(self) -> str | None:
        """Why no rollback can be made, or None."""
        if not self.purged:
            return None
        runs = sorted({run for run, _ in self.purged})
        return (
            f"the deltas of {len(self.purged)} step(s) to subtract (run(s) "
            f"{', '.join(map(str, runs))}) were purged by an earlier erasure"
        )


def plan_rollback(
    session: Session, parent: ModelVersion, forget_ids: Sequence[str]
) -> RollbackPlan:
    """The union of the lineage's steps that touched the forget set, minus those already
    rolled back in the lineage: two samples sharing a step give that step once."""
    chain = weight_lineage(session, parent)
    runs = lineage_runs(session, chain)
    run_ids = {run.id for run in runs}
    touched = {
        ref
        for refs in steps_of_samples(session, forget_ids).values()
        for ref in refs
        if ref[0] in run_ids
    }
    done = rolled_back_steps(session, [v.id for v in chain])
    steps = sorted(touched - done)
    return RollbackPlan(
        steps=steps,
        already_rolled_back=sorted(touched & done),
        total_steps=sum(run.num_steps for run in runs),
        dataset=runs[-1].dataset,
        purged=[(d.run_id, d.step) for d in step_deltas(session, steps) if d.purged_at],
    )


def read_deltas(
    store: ArtifactStore, rows: Sequence[StepDelta], workers: int = 4
) -> Iterator[dict[str, torch.Tensor]]:
    """The deltas in order, sha256 verified, read ``workers`` at a time (bounded read-ahead)."""
    with ThreadPoolExecutor(workers, thread_name_prefix="lethe-read") as pool:
        ahead: deque[Future[dict[str, torch.Tensor]]] = deque()
        for row in rows:
            ahead.append(pool.submit(store.get_tensors, row.store_key, CPU, row.sha256))
            if len(ahead) > 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def subtract_steps(
    model: nn.Module,
    store: ArtifactStore,
    rows: Sequence[StepDelta],
    device: torch.device,
    progress: Progress | None = None,
) -> None:
    """theta <- theta - sum(delta) over the given steps, summed in fp32 on ``device``."""
    entries = tracked_entries(model)
    total = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in entries.items()}
    reporter = ProgressReporter(progress, len(rows))
    for done, delta in enumerate(read_deltas(store, rows), start=1):
        if delta.keys() != total.keys():
            raise ValueError("a recorded delta does not match the model's state_dict entries")
        for name, change in delta.items():
            total[name] += change.to(device, torch.float32)
        reporter.update(done)
    with torch.no_grad():
        for name, tensor in entries.items():
            tensor.sub_(total[name].to(tensor.dtype))


def amnesiac_rollback(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    device: torch.device,
    *,
    repair_steps: int = 0,
    repair_lr_scale: float = 0.1,
    progress: Progress | None = None,
) -> ModelVersion:
    """A candidate version: the parent minus the steps that touched the forget set, then
    ``repair_steps`` recorded fine-tuning steps on the retained data (none by default) at the
    first run's learning rate times ``repair_lr_scale``. At the full rate a fresh optimiser
    costs a converged model 2 to 6 points on digits; a tenth costs none (bench_rollback)."""
    plan = plan_rollback(session, parent, forget_ids)
    if plan.blocked:
        raise ValueError(f"no amnesiac rollback: {plan.blocked}")
    model = load_model(store, parent, device)
    version = new_version(
        session,
        model_spec(parent),
        method=Method.amnesiac_repair if repair_steps else Method.amnesiac,
        state=VersionState.training,
        parent_id=parent.id,
        details={
            "dataset": plan.dataset,
            "forget": list(forget_ids),
            "rolled_back_steps": [list(ref) for ref in plan.steps],
            "affected_share": plan.share,
        },
    )
    mark_rolled_back(session, plan.steps, version.id)
    rollback_end = 30 if repair_steps else 100
    rows = step_deltas(session, plan.steps)
    subtract_steps(model, store, rows, device, within(progress, 0, rollback_end, "rollback"))
    if repair_steps:
        fine_tune_candidate(
            session,
            store,
            parent,
            version,
            model,
            retained_train_set(session, store, plan.dataset, forget_ids),
            continued_config(session, parent, repair_steps, version.id, repair_lr_scale),
            device,
            kind="repair",
            progress=within(progress, rollback_end, 100, "repair"),
        )
    return finish_candidate(session, store, version, model)


def purge_deltas(session: Session, store: ArtifactStore, steps: Sequence[StepRef]) -> list[str]:
    """Deletes the steps' delta objects from the store (they still carry the influence of
    their batches) and marks them purged; the ledger keeps their keys and hashes. Returns the
    sha256 of every object deleted, for the erasure certificate."""
    rows = step_deltas(session, steps)
    for row in rows:
        store.delete(row.store_key)
    mark_deltas_purged(session, [(row.run_id, row.step) for row in rows])
    return [row.sha256 for row in rows]
