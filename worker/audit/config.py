"""How much work an audit does: the sizes of the cached model sets and the iteration bounds of
the per-version attacks. The defaults fit a CPU; ``config/gpu.json`` raises them for a GPU
(more reference models and shadow pairs, longer inversions)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from worker.config import PolicySettings


class AuditConfig(PolicySettings):
    section = "audit"
    model_config = SettingsConfigDict(env_prefix="LETHE_AUDIT_")

    reference_models: int = Field(
        default=8,
        ge=2,
        description="Reference models, each trained like the target on a random half of the "
        "pool: the never-seen distribution of every sample, and Graves et al.'s shadow models",
    )
    reference_seed: int = Field(default=1000, description="Seed of the first reference model")
    pair_shadows: int = Field(
        default=4,
        ge=1,
        description="Reference models that get twins retrained without one member (the "
        "two-version rule's exact-retraining baseline and Chen et al.'s training pairs)",
    )
    removals_per_shadow: int = Field(default=8, ge=1, description="Twins per such reference")
    retained_power_samples: int = Field(
        default=300,
        ge=0,
        description="Retained training samples scored to estimate the membership test's power",
    )
    attack_epochs: int = Field(
        default=10, ge=1, description="Attack MLPs: epochs (Adam), as in the Amnesiac notebook"
    )
    attack_batch_size: int = Field(default=8, ge=1, description="Attack MLPs: batch size")
    report_fpr: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="FPR over H at which the reported calibrated and two-version attacks set "
        "their thresholds",
    )
    low_fprs: tuple[float, ...] = Field(
        default=(0.001, 0.01), description="FPRs at which offline LiRA's TPR is reported"
    )
    inversion_iterations: int = Field(
        default=200,
        ge=1,
        description="Unlearning inversion (Hu et al.) gradient-matching steps; Hu et al. use "
        "10,000 on a GPU. The positive control says whether this budget rebuilds anything",
    )
    inversion_max_samples: int = Field(
        default=1, ge=1, description="Erased samples rebuilt jointly, at most"
    )
    inversion_tv_weight: float = Field(
        default=1e-2, ge=0, description="Total-variation prior weight of the inversion"
    )
    class_inversion_iterations: int = Field(
        default=40,
        ge=1,
        description="Class model inversion steps (Graves et al. ran 1,000-8,000 on MNIST)",
    )
    class_inversion_denoise_every: int = Field(
        default=10, ge=1, description="Denoise the class inversions every this many steps"
    )
