"""Class model inversion, Graves et al.'s variant of Fredrikson et al.: start every class from
faint noise, take plain gradient steps on the input toward the class, and every n steps
denoise (median filter, Gaussian blur, unsharp mask); stop after a fixed number of iterations.
Instead of judging the pictures by eye, an evaluator model trained on data disjoint from the
target's training set says how much each inversion looks like its class."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from app.ledger.erasure import class_inversions_key
from worker.audit.config import AuditConfig
from worker.audit.images import gaussian_blur, median_filter, png_grid
from worker.audit.references import ReferenceSet, train_model
from worker.store import ArtifactStore

STEP_SIZE = 0.1
BLUR_SIGMA = 0.5  # the notebook's sigma 2 is for 28x28 MNIST; 8x8 digits need less
UNSHARP_AMOUNT = 1.0


@dataclass(frozen=True)
class ClassInversion:
    figures: dict[str, Any]
    images: dict[str, bytes]  # artifact name -> PNG


def denoise(images: torch.Tensor) -> torch.Tensor:
    blurred = gaussian_blur(median_filter(images), BLUR_SIGMA)
    return blurred + UNSHARP_AMOUNT * (blurred - gaussian_blur(blurred, BLUR_SIGMA))


def invert_classes(
    model: nn.Module,
    classes: torch.Tensor,
    shape: tuple[int, int, int],
    config: AuditConfig,
    device: torch.device,
    seed: int = 0,
) -> torch.Tensor:
    model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    start = torch.rand((len(classes), *shape), generator=generator) / 64
    images = start.to(device).requires_grad_(True)
    targets = classes.to(device)
    for step in range(1, config.class_inversion_iterations + 1):
        loss = functional.cross_entropy(model(images), targets, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, images)
        with torch.no_grad():
            images -= STEP_SIZE * gradient
            if step % config.class_inversion_denoise_every == 0:
                images.copy_(denoise(images))
            images.clamp_(0, 1)
    return images.detach()


def cached_inversions(
    store: ArtifactStore,
    weights_sha256: str | None,
    model: nn.Module,
    classes: torch.Tensor,
    shape: tuple[int, int, int],
    config: AuditConfig,
    device: torch.device,
) -> torch.Tensor:
    """A version's class inversions, kept by its weights' sha256: computed when the version is
    audited as a candidate, then reused when it is audited as a parent."""
    if weights_sha256 is None:
        return invert_classes(model, classes, shape, config, device)
    settings = f"{config.class_inversion_iterations}x{config.class_inversion_denoise_every}"
    key = class_inversions_key(weights_sha256, settings)
    if not store.exists(key):
        store.put_tensors(key, {"images": invert_classes(model, classes, shape, config, device)})
    return store.get_tensors(key, torch.device("cpu"))["images"]


def evaluator(references: ReferenceSet, device: torch.device) -> nn.Module:
    """A model of the target's architecture and settings trained on the whole pool."""
    pool, seed = references.pool, references.seed - 1
    references.cached(
        "evaluator",
        lambda: train_model(references.spec, pool, references.config, seed, device),
    )
    return references.model("evaluator", device)


@torch.no_grad()
def evaluator_scores(
    judge: nn.Module, images: torch.Tensor, classes: torch.Tensor
) -> dict[str, Any]:
    probabilities = judge.eval()(images).softmax(dim=1).cpu()
    confidence = probabilities.gather(1, classes.view(-1, 1)).squeeze(1)
    recognised = probabilities.argmax(dim=1) == classes
    return {
        "confidence": {int(k): float(v) for k, v in zip(classes, confidence, strict=True)},
        "recognised": {int(k): bool(v) for k, v in zip(classes, recognised, strict=True)},
        "mean_confidence": float(confidence.mean()),
        "recognised_share": float(recognised.float().mean()),
    }


def class_inversion(
    store: ArtifactStore,
    versions: dict[str, tuple[nn.Module, str | None]],
    judge: nn.Module,
    num_classes: int,
    shape: tuple[int, int, int],
    forget_classes: set[int],
    config: AuditConfig,
    device: torch.device,
) -> ClassInversion:
    """Every class inverted from the parent and from the candidate (``versions``: role ->
    model and weights sha256; same starting noise), scored by the evaluator; one PNG per class
    (parent left, candidate right)."""
    classes = torch.arange(num_classes)
    inverted = {
        role: cached_inversions(store, sha, model, classes, shape, config, device).to(device)
        for role, (model, sha) in versions.items()
    }
    figures: dict[str, Any] = {
        name: evaluator_scores(judge, images, classes) for name, images in inverted.items()
    }
    figures.update(
        forget_classes=sorted(forget_classes),
        iterations=config.class_inversion_iterations,
        has_power=figures["parent"]["recognised_share"] > 1 / num_classes,
    )
    images = {
        f"inversion_class_{k}.png": png_grid(
            [torch.stack([inverted["parent"][k], inverted["candidate"][k]])]
        )
        for k in range(num_classes)
    }
    return ClassInversion(figures, images)
