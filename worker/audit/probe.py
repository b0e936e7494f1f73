"""A cheap reading of how member-like the forget set looks to a model while it is being made:
per erased sample, the share of never-seen samples it scores above with the gate's membership
score (0.5 is the level of a typical never-seen sample, 1.0 the most member-like). Relabel
unlearning uses it to stop where forgetting ends, instead of driving F to confidently wrong
labels (which the gate's over-unlearning side rejects)."""

import numpy as np
import torch
from torch import nn

from worker.audit.membership import model_scores
from worker.audit.posteriors import logits, scaled_logit
from worker.audit.references import ReferenceSet
from worker.data import SampleSet


class ForgetProbe:
    def __init__(
        self,
        references: ReferenceSet,
        forget: SampleSet,
        never_seen: SampleSet,
        device: torch.device,
    ) -> None:
        self.forget, self.never_seen, self.device = forget, never_seen, device
        self.difficulty = {
            "forget": self._reference_median(references, forget),
            "null": self._reference_median(references, never_seen),
        }

    def _reference_median(self, references: ReferenceSet, data: SampleSet) -> np.ndarray:
        phis = [
            scaled_logit(
                logits(references.reference(i, self.device), data, self.device), data.labels
            )
            for i in range(len(references.members))
        ]
        median: np.ndarray = torch.stack(phis).median(dim=0).values.numpy()
        return median

    def quantiles(self, model: nn.Module) -> np.ndarray:
        """Per erased sample, the share of never-seen samples scoring below it. Leaves the model
        in the mode it found it in (training calls this between steps)."""
        was_training = model.training
        phi = {
            "forget": self._phi(model, self.forget),
            "null": self._phi(model, self.never_seen),
        }
        model.train(was_training)
        scores = model_scores(phi, self.difficulty)
        below: np.ndarray = (scores.null[None, :] < scores.forget[:, None]).mean(axis=1)
        return below

    def _phi(self, model: nn.Module, data: SampleSet) -> np.ndarray:
        phi: np.ndarray = scaled_logit(logits(model, data, self.device), data.labels).numpy()
        return phi
