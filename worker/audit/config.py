"""How much work an audit does: the sizes of the cached model sets and the iteration bounds of
the per-version attacks. The defaults fit a CPU; raise them on a GPU (16 shadow models as in
Graves et al., more shadow pairs as in Chen et al., longer inversions as in Hu et al.)."""

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AuditConfig:
    reference_models: int = 8  # shadow (Shokri/Graves) and offline-LiRA reference models
    reference_seed: int = 1000
    pair_shadows: int = 4  # shadow models that get one-sample-removed twins (Chen et al.)
    removals_per_shadow: int = 8
    attack_epochs: int = 10  # attack MLPs: 10 epochs, Adam, as in the Amnesiac notebook
    attack_batch_size: int = 8
    inversion_iterations: int = 24  # unlearning inversion (Hu et al. use 10,000 on a GPU)
    inversion_max_samples: int = 4  # erased samples rebuilt jointly, at most
    inversion_tv_weight: float = 1e-2
    class_inversion_iterations: int = 40  # Graves et al. ran 1000-8000 on 28x28 MNIST
    class_inversion_denoise_every: int = 10  # the paper's n in [500, 1000], scaled down
    low_fprs: tuple[float, ...] = (0.001, 0.01)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
