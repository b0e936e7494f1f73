"""Hu et al.'s unlearning inversion: the two versions' weight difference is (up to scale) the
gradient of the loss on the erased samples, so rebuilding inputs whose gradient points the same
way rebuilds the samples (cosine gradient matching with a total-variation prior, signed Adam
steps, pixels clamped to [0, 1]). The label comes from the confidence drop on probe samples.
The worker still holds the true samples (before the purge), so PSNR and SSIM say how close the
rebuilt ones came; a random held-out image of the same class gives the chance level."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional

from worker.audit.config import AuditConfig
from worker.audit.images import png_grid, psnr, ssim, total_variation
from worker.data import SampleSet
from worker.store import ArtifactStore


@dataclass(frozen=True)
class UnlearningInversion:
    figures: dict[str, Any]
    image: bytes  # PNG of the reconstructions only: the true samples must not outlive the purge


def weight_difference(parent: nn.Module, candidate: nn.Module) -> list[torch.Tensor]:
    """theta_candidate - theta_parent per parameter: removing a sample's updates moves the
    weights along +gradient of its loss, so this is the direction to match."""
    after = dict(candidate.named_parameters())
    return [(after[name] - before).detach() for name, before in parent.named_parameters()]


def infer_label(
    parent_probs: torch.Tensor, candidate_probs: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """Probes grouped by the parent's predicted class; the class whose mean confidence fell the
    most (Hu et al.'s label inference, with real test samples as probes)."""
    predicted = parent_probs.argmax(dim=1)
    change = (
        candidate_probs.gather(1, predicted.view(-1, 1)).squeeze(1) - parent_probs.max(1).values
    )
    means = torch.full((num_classes,), float("inf"))
    for k in range(num_classes):
        if (predicted == k).any():
            means[k] = change[predicted == k].mean()
    ranking = means.argsort().tolist()
    return {"label": ranking[0], "ranking": ranking, "mean_change": means.tolist()}


def reconstruct(
    model: nn.Module,
    target: list[torch.Tensor],
    labels: torch.Tensor,
    shape: tuple[int, int, int],
    config: AuditConfig,
    device: torch.device,
) -> torch.Tensor:
    model.to(device).eval()
    parameters = list(model.parameters())
    target_norm = torch.stack([(t * t).sum() for t in target]).sum().sqrt()
    generator = torch.Generator().manual_seed(0)
    dummy = torch.rand((len(labels), *shape), generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=0.1)
    steps = config.inversion_iterations
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], gamma=0.5
    )
    labels = labels.to(device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = functional.cross_entropy(model(dummy), labels)
        gradient = torch.autograd.grad(loss, parameters, create_graph=True)
        dot = torch.stack([(g * t).sum() for g, t in zip(gradient, target, strict=True)]).sum()
        norm = torch.stack([(g * g).sum() for g in gradient]).sum().sqrt()
        objective = 1 - dot / (norm * target_norm + 1e-12)
        objective = objective + config.inversion_tv_weight * total_variation(dummy)
        (dummy.grad,) = torch.autograd.grad(objective, dummy)
        dummy.grad.sign_()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            dummy.clamp_(0, 1)
    return dummy.detach()


def unlearning_inversion(
    parent: nn.Module,
    candidate: nn.Module,
    forget: SampleSet,
    probes: dict[str, torch.Tensor],
    heldout: SampleSet,
    config: AuditConfig,
    device: torch.device,
    control: dict[str, Any],
) -> UnlearningInversion:
    """Rebuilds up to ``inversion_max_samples`` erased samples jointly, with their true labels
    (as Hu et al.'s code does: the strongest attacker), and matches each rebuilt image to the
    true sample it is closest to."""
    shown = forget.select(range(min(len(forget), config.inversion_max_samples)))
    truth = shown.inputs(slice(None)).cpu()
    channels, height, width = truth.shape[1:]
    rebuilt = reconstruct(
        parent,
        weight_difference(parent, candidate),
        shown.labels,
        (channels, height, width),
        config,
        device,
    ).cpu()
    pairwise = np.array([[float(psnr(r[None], t[None])) for t in truth] for r in rebuilt])
    rows, cols = linear_sum_assignment(-pairwise)
    rebuilt, matched = rebuilt[rows], truth[cols]  # the true sample each one came closest to
    label = infer_label(probes["parent"], probes["candidate"], forget.num_classes)
    psnrs, ssims = psnr(rebuilt, matched).tolist(), ssim(rebuilt, matched).tolist()
    chance = chance_psnr(shown, heldout)
    return UnlearningInversion(
        {
            "samples_rebuilt": len(shown),
            "iterations": config.inversion_iterations,
            "psnr": psnrs,
            "ssim": ssims,
            "psnr_mean": float(np.mean(psnrs)),
            "ssim_mean": float(np.mean(ssims)),
            "chance_psnr": chance,
            "beats_chance": chance is not None and float(np.mean(psnrs)) > chance,
            "positive_control": control,
            "inferred_label": label,
            "label_correct": label["label"] in set(forget.labels.tolist()),
        },
        png_grid([rebuilt]),
    )


def positive_control(
    store: ArtifactStore,
    weights_sha256: str | None,
    model: nn.Module,
    heldout: SampleSet,
    config: AuditConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The attack on the easiest case it could face, at the same budget: the weight change of
    one step on one sample alone (its exact gradient; the first held-out sample, which no model
    trained on). If the rebuilt image does not beat the same-class chance PSNR there, the attack
    has no power at this budget, and its figures on a candidate say nothing either way. Kept
    by the model's weights: a parent is the control of every candidate of its jobs."""
    budget = f"{config.inversion_iterations}-{config.inversion_tv_weight:g}"
    key = f"audits/inversion-controls/{weights_sha256}-{budget}.json"
    if weights_sha256 is not None and store.exists(key):
        cached: dict[str, Any] = store.get_json(key)
        return cached
    sample = heldout.select([0])
    others = heldout.select(range(1, len(heldout)))
    figures = control_figures(model, sample, others, config, device)
    if weights_sha256 is not None:
        store.put_json(key, figures)
    return figures


def control_figures(
    model: nn.Module,
    sample: SampleSet,
    others: SampleSet,
    config: AuditConfig,
    device: torch.device,
) -> dict[str, Any]:
    model.to(device).eval()
    inputs, labels = sample.inputs(slice(None)).to(device), sample.labels.to(device)
    loss = functional.cross_entropy(model(inputs), labels)
    gradient = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    channels, height, width = inputs.shape[1:]
    shape = (channels, height, width)
    rebuilt = reconstruct(model, gradient, labels, shape, config, device).cpu()
    value = float(psnr(rebuilt, inputs.cpu()).mean())
    chance = chance_psnr(sample, others)
    return {
        "psnr": value,
        "chance_psnr": chance,
        "has_power": chance is not None and value > chance,
    }


def chance_psnr(samples: SampleSet, heldout: SampleSet) -> float | None:
    """Mean PSNR between each sample and the held-out images of its class: what an attacker
    gets by guessing the class alone."""
    values = []
    for i, label in enumerate(samples.labels.tolist()):
        same = (heldout.labels.cpu() == label).nonzero().squeeze(1)
        if len(same):
            truth = samples.inputs(slice(i, i + 1)).cpu()
            values.append(
                float(psnr(heldout.inputs(same).cpu(), truth.expand(len(same), -1, -1, -1)).mean())
            )
    return float(np.mean(values)) if values else None
