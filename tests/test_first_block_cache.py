"""Apply First Block Cache through ComfyUI's real ModelPatcher and KSampler on tiny FLUX models."""

import pytest
import torch

from fluxaccel.nodes.first_block_cache import ApplyFirstBlockCache
from tests.support.flux_fixtures import tiny_flux_patcher
from tests.support.ksampler_helpers import cache_summaries, conditioning, ksample, relative_error, tiny_lora, with_cache, with_lora


# The tiny random FLUX moves its first block's residual by 0.5-0.8 (relative L1) between steps:
# REUSING_THRESHOLD reuses some steps and computes others; ALWAYS_REUSE reuses whenever allowed.
REUSING_THRESHOLD = 0.8
ALWAYS_REUSE = 100.0


def split_conds():
    """Cond and uncond of different text lengths: ComfyUI cannot batch them and evaluates each alone."""
    return conditioning(tokens=6, seed=1), conditioning(tokens=9, seed=2)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_zero_threshold_is_bit_exact(variant):
    model = tiny_flux_patcher(guidance_embed=variant == "dev")
    assert torch.equal(ksample(with_cache(model, 0.0)), ksample(model))


def test_composes_with_core_model_sampling_patch(caplog_info):
    """Core's ModelSamplingFlux swaps the sigma schedule; the cache's window must follow it."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    (shifted,) = ModelSamplingFlux().patch(tiny_flux_patcher(), 1.15, 0.5, 32, 32)
    assert torch.equal(ksample(with_cache(shifted, 0.0)), ksample(shifted))
    ksample(with_cache(shifted, ALWAYS_REUSE, start_percent=0.5), steps=8)
    (_, _, reused) = cache_summaries(caplog_info)[-1]
    assert 0 < reused <= 4


@pytest.mark.parametrize("conds", ["batched", "split"])
def test_zero_threshold_is_bit_exact_with_cfg(conds):
    model = tiny_flux_patcher()
    positive, negative = split_conds() if conds == "split" else (None, None)
    expected = ksample(model, positive, negative, cfg=3.0)
    assert torch.equal(ksample(with_cache(model, 0.0), positive, negative, cfg=3.0), expected)


def test_tiny_threshold_reuses_nothing(caplog_info):
    """Every step moves the first block's residual a little: a threshold below that never reuses.

    (ComfyUI's blocks add to their input in place; a residual measured after the fact is zero.)
    """
    ksample(with_cache(tiny_flux_patcher(), 1e-6), steps=8)
    assert cache_summaries(caplog_info) == [(8, 8, 0)]


def test_positive_threshold_reuses_steps_and_stays_close(caplog_info):
    model = tiny_flux_patcher()
    expected = ksample(model, steps=12)
    cached = ksample(with_cache(model, REUSING_THRESHOLD), steps=12)
    [(computed, total, reused)] = cache_summaries(caplog_info)
    assert total == 12 and 3 <= reused <= 10 and computed + reused == 12
    assert 0.0 < relative_error(cached, expected) < 0.1


@pytest.mark.parametrize("conds", ["batched", "split"])
def test_cond_and_uncond_decide_together(conds, caplog_info):
    model = with_cache(tiny_flux_patcher(), REUSING_THRESHOLD)
    positive, negative = split_conds() if conds == "split" else (None, None)
    ksample(model, positive, negative, cfg=3.0, steps=10)
    [(computed, total, reused)] = cache_summaries(caplog_info)
    assert total == 10, "one decision per step, however many calls the step makes"
    assert reused > 0


def test_each_run_starts_a_fresh_cache(caplog_info):
    model = with_cache(tiny_flux_patcher(), REUSING_THRESHOLD)
    first = ksample(model, seed=3)
    other_seed = ksample(model, seed=4)
    other_size = ksample(model, seed=3, size=48)
    again = ksample(model, seed=3)
    assert torch.equal(first, again), "a stale cache from an earlier run would change the result"
    assert other_seed.shape == first.shape and other_size.shape[-1] == 6
    summaries = cache_summaries(caplog_info)
    assert len(summaries) == 4 and summaries[0] == summaries[3]


def test_skipping_window_limits_reuse(caplog_info):
    model = tiny_flux_patcher()
    ksample(with_cache(model, ALWAYS_REUSE, start_percent=0.0, end_percent=0.0), steps=8)
    ksample(with_cache(model, ALWAYS_REUSE, start_percent=0.5, end_percent=1.0), steps=8)
    [(_, _, reused_nowhere), (_, _, reused_late)] = cache_summaries(caplog_info)
    assert reused_nowhere == 0
    assert 0 < reused_late <= 4


def test_max_consecutive_hits_bounds_reuse(caplog_info):
    model = tiny_flux_patcher()
    ksample(with_cache(model, ALWAYS_REUSE), steps=9)
    ksample(with_cache(model, ALWAYS_REUSE, max_consecutive_hits=2), steps=9)
    [(_, _, unlimited), (computed, _, limited)] = cache_summaries(caplog_info)
    assert unlimited == 8
    assert (computed, limited) == (3, 6)


def test_input_model_is_untouched():
    model = tiny_flux_patcher()
    expected = ksample(model, steps=8)
    ksample(with_cache(model, ALWAYS_REUSE), steps=8)
    assert "patches_replace" not in model.model_options["transformer_options"]
    assert torch.equal(ksample(model, steps=8), expected)


def test_applying_twice_keeps_one_cache(caplog_info):
    model = tiny_flux_patcher()
    once = ksample(with_cache(model, REUSING_THRESHOLD))
    twice = ksample(with_cache(with_cache(model, ALWAYS_REUSE), REUSING_THRESHOLD))
    assert torch.equal(once, twice), "the second node's settings replace the first's"
    assert len(cache_summaries(caplog_info)) == 2


@pytest.mark.parametrize("threshold", [0.0, REUSING_THRESHOLD])
def test_lora_before_or_after_gives_the_same_image(threshold):
    model = tiny_flux_patcher()
    lora = tiny_lora(model)
    lora_then_cache = ksample(with_cache(with_lora(model, lora, 0.5), threshold))
    cache_then_lora = ksample(with_lora(with_cache(model, threshold), lora, 0.5))
    assert torch.equal(lora_then_cache, cache_then_lora)
    assert relative_error(lora_then_cache, ksample(model)) > 1e-3, "the LoRA must change the image"
    if threshold == 0.0:
        assert torch.equal(lora_then_cache, ksample(with_lora(model, lora, 0.5)))


def test_keeps_another_packs_block_replacement():
    model = tiny_flux_patcher()
    calls = []

    def counting_replacement(args, extra):
        calls.append(args["transformer_options"]["block_index"])
        return extra["original_block"](args)

    other = model.clone()
    other.set_model_patch_replace(counting_replacement, "dit", "double_block", 1)
    expected = ksample(other, steps=4)
    calls.clear()
    assert torch.equal(ksample(with_cache(other, 0.0), steps=4), expected)
    assert calls == [1, 1, 1, 1]


def test_non_flux_model_gets_a_clear_error():
    model = tiny_flux_patcher()
    model.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="supports FLUX.1 .dev, schnell, Kontext., FLUX.2 .*diffusion model is Linear"):
        with_cache(model, 0.1)


@pytest.mark.parametrize("start, end, message", [
    (0.6, 0.4, "must not be greater than end_percent"),
    (-0.1, 0.5, "start_percent must be between 0 and 1"),
    (0.0, 1.5, "end_percent must be between 0 and 1"),
])
def test_bad_window_is_rejected(start, end, message):
    assert message in ApplyFirstBlockCache.validate_inputs(start, end)
    assert ApplyFirstBlockCache.validate_inputs(0.2, 0.8) is True
