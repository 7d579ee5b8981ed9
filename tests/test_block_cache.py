"""Apply Block Cache (probe and tail blocks, Taylor predictions, a fixed schedule) through ComfyUI's real
ModelPatcher and KSampler on tiny FLUX models (2 double + 3 single blocks unless a test says otherwise)."""
import pytest
import torch

from tests.support.flux_fixtures import tiny_flux_patcher
from fluxaccel.nodes.first_block_cache import ApplyBlockCache
from tests.support.ksampler_helpers import (cache_summaries, conditioning, ksample, relative_error, with_block_cache,
                                            with_cache)

REUSING_THRESHOLD = 0.8
ALWAYS_REUSE = 100.0
# Probe/tail layouts over the tiny FLUX's 5 blocks: the decision after a double or a single block, the
# skipped blocks ending in a single or a double block (the tail then starts in the double blocks).
LAYOUTS = [(1, 0), (2, 0), (1, 2), (3, 1), (1, 3)]


@pytest.mark.parametrize("threshold", [0.0, REUSING_THRESHOLD])
def test_order_0_probe_1_tail_0_is_first_block_cache_bit_for_bit(threshold, caplog_info):
    model = tiny_flux_patcher()
    expected = ksample(with_cache(model, threshold), steps=10)
    assert torch.equal(ksample(with_block_cache(model, threshold, taylor_order=0), steps=10), expected)
    first, block = cache_summaries(caplog_info)
    assert first == block


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("probe_blocks, tail_blocks", LAYOUTS)
def test_zero_threshold_is_the_uncached_model_bit_for_bit(order, probe_blocks, tail_blocks):
    model = tiny_flux_patcher()
    cached = with_block_cache(model, 0.0, order, probe_blocks=probe_blocks, tail_blocks=tail_blocks)
    assert torch.equal(ksample(cached, cfg=2.0), ksample(model, cfg=2.0))


@pytest.mark.parametrize("probe_blocks, tail_blocks", LAYOUTS)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_every_layout_and_order_reuses_steps_and_stays_close(order, probe_blocks, tail_blocks, caplog_info):
    model = tiny_flux_patcher()
    expected = ksample(model, steps=12, cfg=2.0)
    cached = ksample(with_block_cache(model, ALWAYS_REUSE, order, max_consecutive_hits=1, probe_blocks=probe_blocks,
                                      tail_blocks=tail_blocks), steps=12, cfg=2.0)
    [(computed, total, reused)] = cache_summaries(caplog_info)
    assert (computed, reused) == (6, 6)
    assert 0.0 < relative_error(cached, expected) < 0.2


def test_every_n_steps_computes_one_step_in_n(caplog_info):
    model = tiny_flux_patcher()
    ksample(with_block_cache(model, 0.0, 1, every_n_steps=3), steps=9)
    ksample(with_block_cache(model, 0.0, 1, every_n_steps=3, start_percent=0.5), steps=9)
    [(computed, _, reused), (late_computed, _, late_reused)] = cache_summaries(caplog_info)
    assert (computed, reused) == (3, 6)
    assert late_reused < reused and late_computed + late_reused == 9


@pytest.mark.parametrize("conds", ["batched", "split"])
def test_cond_and_uncond_keep_their_own_history(conds, caplog_info):
    model = tiny_flux_patcher()
    positive, negative = ((conditioning(tokens=6, seed=1), conditioning(tokens=9, seed=2)) if conds == "split"
                          else (None, None))
    cached = with_block_cache(model, REUSING_THRESHOLD, 2, probe_blocks=2, tail_blocks=1)
    first = ksample(cached, positive, negative, cfg=3.0, steps=10)
    assert torch.equal(ksample(cached, positive, negative, cfg=3.0, steps=10), first)
    [(_, total, reused), _] = cache_summaries(caplog_info)
    assert total == 10 and reused > 0


def test_applying_after_first_block_cache_replaces_it_and_frees_the_tail(caplog_info):
    model = tiny_flux_patcher()
    expected = ksample(with_block_cache(model, REUSING_THRESHOLD, 1, tail_blocks=2), steps=8)
    stacked = with_block_cache(with_cache(model, ALWAYS_REUSE), REUSING_THRESHOLD, 1, tail_blocks=2)
    assert torch.equal(ksample(stacked, steps=8), expected)
    replaced = stacked.model_options["transformer_options"]["patches_replace"]["dit"]
    assert ("single_block", 2) not in replaced and ("single_block", 1) not in replaced, "the tail runs as is"
    assert [line.split(":")[0] for line in (r.getMessage() for r in caplog_info.records) if "Block Cache (" in line] \
        == ["Block Cache (F1B2, order 1, threshold 0.8)"] * 2


@pytest.mark.parametrize("probe_blocks, tail_blocks", [(5, 0), (1, 4), (3, 2), (0, 1)])
def test_a_layout_that_leaves_no_block_to_skip_gets_a_clear_error(probe_blocks, tail_blocks):
    with pytest.raises(ValueError, match=r"Apply Block Cache probe_blocks \(\d+\) \+ tail_blocks \(\d+\) must leave "
                                         r"at least one of the model's 5 blocks to skip"):
        with_block_cache(tiny_flux_patcher(), 0.1, probe_blocks=probe_blocks, tail_blocks=tail_blocks)


def test_bad_window_is_rejected():
    assert "must not be greater than end_percent" in ApplyBlockCache.validate_inputs(0.6, 0.4)


def test_a_quality_target_with_a_fixed_schedule_gets_a_clear_error():
    with pytest.raises(ValueError, match="a quality target calibrates the threshold, which every_n_steps does not use"):
        with_block_cache(tiny_flux_patcher(), 0.0, 1, every_n_steps=2, quality="balanced (44 dB)")
