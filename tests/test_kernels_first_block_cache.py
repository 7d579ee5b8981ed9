"""The First Block Cache decision and store, without ComfyUI."""
import pytest
import torch

from fluxaccel.kernels.first_block_cache import (
    FirstBlockCache,
    RowStore,
    absolute_difference_sums,
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


def seeded_cache(threshold=0.1, max_consecutive_hits=0):
    cache = FirstBlockCache(threshold, max_consecutive_hits)
    residual = torch.ones(1, 4, 3)
    cache.start_step(sigma=1.0, reuse_allowed=True)
    assert not cache.should_reuse(["c"], residual), "nothing cached yet"
    cache.store_first_residual(["c"], residual)
    cache.store_remaining_residual(["c"], torch.full((1, 6, 3), 5.0))
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
    cache.store_first_residual(["u"], residual)
    cache.store_remaining_residual(["u"], torch.zeros(1, 6, 3))
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
