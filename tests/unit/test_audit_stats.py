"""The statistics and image measures behind the audit figures."""

import json
import math

import numpy as np
import pytest
import torch

from worker.audit.images import psnr, ssim, total_variation
from worker.audit.report import json_safe
from worker.audit.stats import auc_with_interval, clopper_pearson, rates_at_fpr, threshold_at_fpr
from worker.audit.unlearning_mia import FEATURES, degradation


def test_clopper_pearson_matches_the_closed_forms_at_the_edges() -> None:
    none_of_ten = clopper_pearson(0, 10)
    assert none_of_ten.value == 0 and none_of_ten.low == 0
    assert none_of_ten.high == pytest.approx(1 - 0.025 ** (1 / 10))
    all_of_ten = clopper_pearson(10, 10)
    assert all_of_ten.high == 1 and all_of_ten.low == pytest.approx(0.025 ** (1 / 10))
    assert clopper_pearson(0, 0).value is None


def test_a_single_sample_gives_a_wide_interval() -> None:
    one = clopper_pearson(1, 1)
    assert one.low == pytest.approx(0.025) and one.high == 1


def test_one_sample_at_the_end_of_the_ranking_proves_nothing() -> None:
    # Hanley-McNeil alone gives [0, 0] here: one hard sample would "prove" over-unlearning.
    lowest = auc_with_interval([-5.0], np.linspace(0, 1, 270))
    assert lowest["value"] == 0 and lowest["low"] == 0 and lowest["high"] == 1


def test_auc_interval_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    small = auc_with_interval(rng.normal(1, 1, 3), rng.normal(0, 1, 300))
    large = auc_with_interval(rng.normal(1, 1, 300), rng.normal(0, 1, 300))
    assert small["low"] <= small["value"] <= small["high"]
    assert large["high"] - large["low"] < small["high"] - small["low"]
    assert 0.7 < large["value"] < 0.84  # Phi(1 / sqrt 2) = 0.76


def test_threshold_flags_at_most_the_target_share_of_negatives() -> None:
    negatives = np.arange(1000, dtype=float)
    threshold = threshold_at_fpr(negatives, 0.01)
    assert (negatives > threshold).sum() == 10
    # 100 negatives cannot resolve 0.1%: nothing above the largest one is flagged.
    assert threshold_at_fpr(negatives[:100], 0.001) == 99
    rates = rates_at_fpr([2000.0, -1.0], negatives, 0.01)
    assert rates["tpr"]["k"] == 1 and rates["fpr"]["k"] == 10


def test_psnr_ssim_and_tv_of_identical_and_different_images() -> None:
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(image, image), torch.ones(2), atol=1e-5)
    assert (psnr(image, image) == 100).all()
    assert (psnr(1 - image, image) < 10).all()
    assert total_variation(torch.ones(1, 1, 8, 8)) == 0


def test_json_safe_turns_numpy_and_non_finite_values_into_plain_json() -> None:
    value = {"a": np.float32(0.5), "b": [math.nan, math.inf], "c": np.arange(2), 3: (1,)}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == {"a": 0.5, "b": [None, None], "c": [0, 1], "3": [1]}


def test_two_version_features_and_degradation() -> None:
    p_o = torch.tensor([[0.7, 0.2, 0.1]])
    p_u = torch.tensor([[0.2, 0.7, 0.1]])
    shapes = {name: tuple(feature(p_o, p_u).shape) for name, feature in FEATURES.items()}
    assert shapes == {
        "direct_diff": (1, 3),
        "sorted_diff": (1, 3),
        "direct_concat": (1, 6),
        "l2_distance": (1, 1),
        "basic_mia": (1, 3),
    }
    assert torch.allclose(FEATURES["sorted_diff"](p_o, p_u), torch.tensor([[0.5, -0.5, 0.0]]))
    # More confident of the truth on both deleted (F) and never-seen (H) samples: a gain.
    gain = degradation(
        {"forget": np.array([0.9]), "heldout": np.array([0.1])},
        {"forget": np.array([0.6]), "heldout": np.array([0.3])},
    )
    assert gain["forget"]["deg_count"] == 1 and gain["forget"]["deg_rate"] == pytest.approx(0.3)
    assert gain["forget_and_heldout"]["deg_rate"] == pytest.approx(0.25)
