"""The cache's decisions, store and predictions (First Block Cache, Block Cache), without ComfyUI."""
import math

import pytest
import torch

from fluxaccel.kernels.residual_cache import (
    CachePolicy,
    PredictionState,
    ResidualCache,
    RowStore,
    absolute_difference_sums,
    calibrated_threshold,
    latent_psnr,
    relative_l1_distance,
)


def test_relative_l1_distance_matches_float64_reference():
    current = torch.randn(2, 7, 5, dtype=torch.bfloat16)
    previous = torch.randn(2, 7, 5, dtype=torch.bfloat16)
    expected = ((current.double() - previous.double()).abs().mean() / previous.double().abs().mean()).item()
    assert relative_l1_distance(absolute_difference_sums(current, previous)) == pytest.approx(expected, rel=1e-6)


def test_relative_l1_distance_of_zero_reference():
    zeros = torch.zeros(3)
    assert relative_l1_distance(absolute_difference_sums(zeros, zeros)) == 0.0
    assert relative_l1_distance(absolute_difference_sums(torch.ones(3), zeros)) == float("inf")


def test_row_store_keeps_each_conditioning_apart():
    store = RowStore()
    batch = torch.arange(4.0).reshape(4, 1)
    store.put(["cond", "uncond"], batch)
    assert torch.equal(store.get(["uncond", "cond"]), torch.tensor([[2.0], [3.0], [0.0], [1.0]]))
    assert store.has(["uncond"], like=torch.zeros(2, 1))
    assert not store.has(["uncond"], like=torch.zeros(2, 2)), "a changed shape is not a cache hit"
    assert not store.has(["other"])


def seeded_cache(threshold=0.1, max_consecutive_hits=0, **policy):
    cache = ResidualCache(CachePolicy(threshold, max_consecutive_hits, **policy))
    residual = torch.ones(1, 4, 3)
    cache.start_step(sigma=1.0, reuse_allowed=True)
    assert not cache.should_reuse(["c"], residual), "nothing cached yet"
    cache.store_probe_residual(["c"], residual)
    cache.store_computed_residual(["c"], torch.full((1, 6, 3), 5.0))
    return cache, residual


def test_reuses_below_threshold_and_computes_above():
    cache, residual = seeded_cache(threshold=0.1)
    cache.start_step(sigma=0.9, reuse_allowed=True)
    assert cache.should_reuse(["c"], residual * 1.05)
    cache.start_step(sigma=0.8, reuse_allowed=True)
    assert not cache.should_reuse(["c"], residual * 1.2)
    assert (cache.stats.computed_steps, cache.stats.reused_steps) == (2, 1)
    assert cache.distances == pytest.approx([0.05, 0.2])


def test_step_decision_is_shared_by_every_call_of_the_step():
    cache, residual = seeded_cache()
    cache.store_probe_residual(["u"], residual)
    cache.store_computed_residual(["u"], torch.zeros(1, 6, 3))
    cache.start_step(sigma=0.9, reuse_allowed=True)
    assert cache.should_reuse(["c"], residual)
    assert cache.should_reuse(["u"], residual * 100), "the uncond call follows the step's decision"
    assert cache.stats.reused_steps == 1


def test_outside_the_window_every_step_computes():
    cache, residual = seeded_cache()
    cache.start_step(sigma=0.9, reuse_allowed=False)
    assert not cache.should_reuse(["c"], residual)


def test_max_consecutive_hits_forces_a_computed_step():
    cache, residual = seeded_cache(max_consecutive_hits=2)
    decisions = []
    for sigma in (0.9, 0.8, 0.7, 0.6):
        cache.start_step(sigma, reuse_allowed=True)
        decisions.append(cache.should_reuse(["c"], residual))
    assert decisions == [True, True, False, True]


def test_a_restarted_schedule_drops_the_cache():
    cache, residual = seeded_cache()
    cache.start_step(sigma=2.0, reuse_allowed=True)
    assert not cache.should_reuse(["c"], residual)


def test_zero_threshold_never_reuses():
    cache, residual = seeded_cache(threshold=0.0)
    cache.start_step(sigma=0.9, reuse_allowed=True)
    assert not cache.should_reuse(["c"], residual)


def test_reduce_sums_makes_the_decision_global():
    """Under context parallel each rank holds a shard; the summed distance decides for all."""
    other_rank_sums = torch.tensor([10.0, 1.0])
    cache, residual = seeded_cache()
    cache.start_step(sigma=0.9, reuse_allowed=True)
    assert not cache.should_reuse(["c"], residual, reduce_sums=lambda sums: sums + other_rank_sums), \
        "the other rank's large change must veto reuse"
    assert cache.distances == pytest.approx([10.0 / 13.0])


def test_every_n_steps_computes_every_nth_step_without_measuring():
    cache, residual = seeded_cache(threshold=0.0, every_n_steps=3)
    decisions = []
    for sigma in (0.9, 0.8, 0.7, 0.6, 0.5):
        cache.start_step(sigma, reuse_allowed=True)
        decisions.append(cache.should_reuse(["c"], residual * 100))
    assert decisions == [True, True, False, True, True] and cache.distances == []


def taylor_cache(order):
    """A cache whose key "c" computed R(s) = s^2 at sigmas 1.0, 0.8, 0.7 (a quadratic in sigma)."""
    cache = ResidualCache(CachePolicy(0.5, prediction_order=order))
    for sigma in (1.0, 0.8, 0.7):
        cache.start_step(sigma, reuse_allowed=False)
        cache.should_reuse(["c"], torch.ones(1, 2))
        cache.store_probe_residual(["c"], torch.ones(1, 2))
        cache.store_computed_residual(["c"], torch.full((1, 2, 3), sigma ** 2))
    cache.start_step(0.5, reuse_allowed=True)
    return cache


@pytest.mark.parametrize("order, expected", [(0, 0.49), (1, 0.49 - 0.2 * 1.5), (2, 0.25)])
def test_taylor_orders_extrapolate_the_stored_residuals_in_sigma(order, expected):
    """Order 0 reuses R(0.7); order 1 steps along the last slope (R(0.7) - R(0.8)) / (0.7 - 0.8) = 1.5;
    order 2 is exact for a quadratic: R(0.5) = 0.25."""
    cache = taylor_cache(order)
    assert cache.should_reuse(["c"], torch.ones(1, 2))
    torch.testing.assert_close(cache.predicted_residual(["c"], "cpu"), torch.full((1, 2, 3), expected))


def test_taylor_terms_wait_for_enough_computed_steps():
    cache = ResidualCache(CachePolicy(0.5, prediction_order=2))
    cache.start_step(1.0, reuse_allowed=False)
    cache.store_computed_residual(["c"], torch.full((1, 2, 3), 1.0))
    cache.start_step(0.5, reuse_allowed=True)
    torch.testing.assert_close(cache.predicted_residual(["c"], "cpu"), torch.full((1, 2, 3), 1.0))
    coefficients = cache.prediction_coefficients(["c", "u"], 2, "cpu")
    assert coefficients.flatten().tolist() == [0.0, 0.0, 0.0, 0.0]


def test_a_captured_forwards_tensors_receive_what_launched_calls_stored_and_zeros_where_none():
    cache = taylor_cache(2)
    probe_references = torch.full((2, 2), float("nan"))
    state = PredictionState(*(torch.full((2, 2, 3), float("nan")) for _ in range(3)))
    cache.copy_stored_into(["c", "new"], probe_references, state)
    assert torch.equal(state.residual[0], torch.full((2, 3), 0.49)) and torch.equal(state.residual[1], torch.zeros(2, 3))
    assert torch.equal(state.slope[1], torch.zeros(2, 3)) and torch.equal(state.curvature[1], torch.zeros(2, 3)), \
        "a key without history contributes 0, not 0 * NaN"
    assert torch.equal(probe_references[0], torch.ones(2))


@pytest.mark.parametrize("target", [44.0, 20.0, 61.0])
def test_calibration_finds_the_largest_threshold_that_keeps_the_target(target):
    """On a PSNR that falls with the threshold (stepwise, as skipped steps are), within the search's resolution;
    threshold 0 reuses nothing (the uncached result itself), so a target nothing else keeps gets 0."""
    def psnr_at(threshold):
        return math.inf if threshold == 0.0 else 60.0 - 100.0 * round(threshold, 2)

    found = calibrated_threshold(psnr_at, target, highest=0.5, halvings=5)
    assert psnr_at(found) >= target
    assert found == 0.5 if psnr_at(0.5) >= target else psnr_at(found + 0.5 / 32) < target


def test_latent_psnr_takes_the_references_range_as_peak():
    reference = torch.tensor([0.0, 2.0])
    assert latent_psnr(torch.tensor([0.2, 2.0]), reference) == pytest.approx(10 * math.log10(4 / 0.02))
    assert math.isinf(latent_psnr(reference, reference))
