"""What an attacker reads from a model: softmax posteriors, per-sample losses and LiRA's scaled
logit, on the CPU, computed in eval mode in batches."""

import torch
from torch import nn

from worker.data import SampleSet


@torch.no_grad()
def logits(
    model: nn.Module, data: SampleSet, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """(N, C) logits in fp32 on the CPU."""
    model.to(device).eval()
    data = data.to(device)
    chunks = [
        model(data.inputs(slice(start, start + batch_size))).float().cpu()
        for start in range(0, len(data), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, data.num_classes)


def softmax(model: nn.Module, data: SampleSet, device: torch.device) -> torch.Tensor:
    return logits(model, data, device).softmax(dim=1)


def true_class_confidence(raw_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_y: the probability given to the true label (higher means more member-like)."""
    return raw_logits.softmax(dim=1).gather(1, labels.view(-1, 1).cpu()).squeeze(1)


def scaled_logit(raw_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic log(p_y / (1 - p_y)), computed stably as z_y - logsumexp(z_others)."""
    labels = labels.view(-1, 1).cpu()
    true = raw_logits.gather(1, labels).squeeze(1)
    others = raw_logits.scatter(1, labels, float("-inf"))
    return true - others.logsumexp(dim=1)
