"""Fidelity of First Block Cache and Block Cache on a trained FLUX, through ComfyUI's real ModelPatcher and KSampler.

The model (tests/assets/tiny_flux_shapes.safetensors, from bench/fidelity/train_tiny_flux.py) is a small
FLUX of ComfyUI's own classes trained to draw the shape, colour and position its prompt asks for.
First it must be shown to do that; only then does "the cached image stays close" mean anything.
"""
import math

import pytest
import torch

from bench.fidelity import caches as fidelity
from tests.support.cache_reports import parse_calibrated_threshold
from bench.fidelity.train_tiny_flux import ALL_CONDITIONS

CONDITIONS = fidelity.spread_conditions(8)
# Held out from the seeds of docs/FIDELITY.md's curve, so the default is not tuned to these images.
SEEDS = (10, 11)


@pytest.fixture(scope="module")
def shapes_model():
    return fidelity.load_shapes_model()


@pytest.fixture(scope="module")
def references(shapes_model):
    return fidelity.reference_samples(shapes_model, fidelity.cases_of(CONDITIONS, SEEDS))


def test_trained_model_draws_the_asked_condition(shapes_model, references):
    latent_format = shapes_model.patcher.model.latent_format
    recognised, own_similarity, best_other_similarity = 0, [], []
    for (condition, _), latent in references.items():
        similarities = fidelity.template_similarities(latent, shapes_model.world, latent_format)
        own = similarities[ALL_CONDITIONS.index(condition)]
        others = [s for c, s in zip(ALL_CONDITIONS, similarities) if c != condition]
        recognised += own > max(others)
        own_similarity.append(own)
        best_other_similarity.append(max(others))
    accuracy = recognised / len(references)
    print(f"nearest-template accuracy {accuracy:.2f} over {len(references)} samples of {len(ALL_CONDITIONS)} prompts; "
          f"mean similarity to the asked drawing {sum(own_similarity) / len(own_similarity):.3f}, "
          f"to the closest other {sum(best_other_similarity) / len(best_other_similarity):.3f}")
    assert accuracy >= 0.8


def node_default_threshold():
    return fidelity.node_default_threshold()


def block_cache_default():
    """Apply Block Cache at its defaults, as a fidelity.CacheSetting."""
    from fluxaccel.nodes.first_block_cache import ApplyBlockCache

    defaults = {i.id: i.default for i in ApplyBlockCache.define_schema().inputs if i.id != "model"}
    return fidelity.CacheSetting(defaults["residual_diff_threshold"], True, defaults["taylor_order"],
                                 defaults["probe_blocks"], defaults["tail_blocks"], defaults["every_n_steps"])


def test_default_threshold_skips_a_third_and_keeps_30_db(shapes_model, references):
    """The node's default (0.12, chosen by `python -m bench.fidelity.caches`, docs/FIDELITY.md) is fast and faithful."""
    [point] = fidelity.cache_curve([node_default_threshold()], SEEDS, CONDITIONS, model=shapes_model, references=references)
    print(f"threshold {point.threshold}: skipped {100 * point.skipped_fraction:.1f} % of {fidelity.STEPS} steps, "
          f"PSNR mean {point.mean_psnr:.1f} dB / min {point.min_psnr:.1f} dB, SSIM {point.mean_ssim:.4f} "
          f"over {point.cases} cases")
    assert point.cases >= 4
    assert point.skipped_fraction >= 0.35
    assert point.mean_psnr >= 30.0


def test_block_cache_default_skips_more_steps_than_first_block_caches_at_no_lower_psnr(shapes_model, references):
    """What docs/FIDELITY.md chose Block Cache's default by, on seeds held out from its table."""
    first, block = fidelity.cache_curve([node_default_threshold(), block_cache_default()], SEEDS, CONDITIONS,
                                        model=shapes_model, references=references)
    print(f"First Block Cache {first.skipped_fraction:.3f} skipped at {first.mean_psnr:.1f} dB; "
          f"Block Cache {block.skipped_fraction:.3f} at {block.mean_psnr:.1f} dB")
    assert block.skipped_fraction >= 1.15 * first.skipped_fraction
    assert block.mean_psnr >= first.mean_psnr


def test_a_taylor_step_is_6_db_closer_at_first_block_caches_skipping(shapes_model, references):
    """The issue's bar on held-out seeds: at First Block Cache's default threshold (the same steps skipped),
    order 1 predictions land at least 6 dB closer to the uncached images than reuse."""
    threshold = node_default_threshold()
    first, taylor = fidelity.cache_curve([threshold, fidelity.CacheSetting(threshold, True, 1)], SEEDS, CONDITIONS,
                                         model=shapes_model, references=references)
    assert taylor.skipped_fraction >= first.skipped_fraction - 0.01
    assert taylor.mean_psnr >= first.mean_psnr + 6.0, (first, taylor)


# The image a quality target is calibrated on: neither its prompt nor its seed is among the held-out cases.
CALIBRATION_CASE = (fidelity.spread_conditions(12)[-1], 20)


def calibration_reports(caplog):
    return [record.getMessage() for record in caplog.records if " dB target, threshold " in record.getMessage()]


@pytest.mark.parametrize("quality, target_db", [("fast (38 dB)", 38.0), ("balanced (44 dB)", 44.0), ("quality (50 dB)", 50.0)])
def test_a_quality_target_calibrated_on_one_image_holds_within_2_db_on_held_out_seeds(
        shapes_model, references, quality, target_db, caplog_info):
    from fluxaccel.nodes import first_block_cache

    first_block_cache.forget_calibrations()
    assert CALIBRATION_CASE[0] not in CONDITIONS and CALIBRATION_CASE[1] not in SEEDS
    setting = fidelity.CacheSetting(0.0, True, 1, quality=quality)
    calibrated, _ = fidelity.sample_cached(shapes_model.patcher, setting, *CALIBRATION_CASE, shapes_model.world,
                                           fidelity.STEPS)
    [point] = fidelity.cache_curve([setting], SEEDS, CONDITIONS, model=shapes_model, references=references)
    reports = calibration_reports(caplog_info)
    threshold = parse_calibrated_threshold(reports[0])
    at_threshold, _ = fidelity.sample_cached(shapes_model.patcher, fidelity.CacheSetting(threshold, True, 1),
                                             *CALIBRATION_CASE, shapes_model.world, fidelity.STEPS)
    assert torch.equal(calibrated, at_threshold), "the calibrated run samples at the threshold it reports"
    print(f"{quality}: {reports[0]}; held out: {point.mean_psnr:.1f} dB, {100 * point.skipped_fraction:.1f} % skipped")
    assert "calibrated in this run over" in reports[0]
    assert all("calibrated earlier this session" in report for report in reports[1:]) and len(reports) == 1 + point.cases
    assert abs(point.mean_psnr - target_db) <= 2.0
    assert point.skipped_fraction > 0.5


def test_tiny_threshold_reuses_almost_nothing(shapes_model, references):
    """On a trained FLUX the first block's residual moves every step by more than 0.1 %.

    A cache that reuses most steps even here is not measuring that change (a residual read as zero).
    """
    [point] = fidelity.cache_curve([0.001], SEEDS, CONDITIONS[:4], model=shapes_model, references=references)
    assert point.skipped_fraction <= 0.1


def test_metrics_agree_with_kornia():
    kornia = pytest.importorskip("kornia")
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 16, 24, 24, generator=generator, dtype=torch.float64)
    result = reference + 0.2 * torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    peak = (reference.max() - reference.min()).item()
    expected_ssim = kornia.metrics.ssim(result, reference, fidelity.SSIM_WINDOW, max_val=peak, padding="valid").mean()
    assert fidelity.ssim(result, reference) == pytest.approx(expected_ssim.item(), abs=1e-6)
    expected_psnr = kornia.metrics.psnr(result, reference, peak).item()
    assert fidelity.psnr(result, reference) == pytest.approx(expected_psnr, abs=1e-6)
    assert fidelity.ssim(reference, reference) == pytest.approx(1.0) and math.isinf(fidelity.psnr(reference, reference))


def test_a_cache_blind_to_change_fails_the_bar(shapes_model, references, monkeypatch):
    """The instrument can fail: a cache that reads every residual change as zero (the bug of a
    residual measured after an in-place block) reuses nearly every step and must score below 30 dB."""
    import fluxaccel.kernels.residual_cache as residual_cache

    monkeypatch.setattr(residual_cache, "relative_l1_distance", lambda sums: 0.0)
    [point] = fidelity.cache_curve([node_default_threshold()], SEEDS, CONDITIONS, model=shapes_model, references=references)
    assert point.skipped_fraction > 0.9
    assert point.mean_psnr < 30.0, f"a blind cache scored {point.mean_psnr:.1f} dB"


def test_fp8_keeps_the_trained_models_pictures_with_under_half_of_core_fp8s_error(shapes_model):
    """FP8 Dynamic Quantize's tensor-core math (torch._scaled_mm on the CPU) against core fp8_e4m3fn_fast,
    both against the bf16 model, on held-out seeds (bench/fidelity/fp8.py has the full table)."""
    import comfy.ops

    from bench.fidelity import fp8 as fp8_fidelity

    cases = fidelity.cases_of(CONDITIONS[:3], SEEDS)
    bf16 = fp8_fidelity.shapes_model_as(shapes_model, torch.bfloat16, None)
    references = fp8_fidelity.sample_all(bf16, cases, shapes_model.world, fidelity.STEPS)
    pack = fp8_fidelity.compare(fp8_fidelity.sample_all(fp8_fidelity.pack_fp8(bf16), cases, shapes_model.world,
                                                        fidelity.STEPS, fp8_tensor_cores=True), references)
    core_model = fp8_fidelity.shapes_model_as(shapes_model, torch.float8_e4m3fn, torch.bfloat16, comfy.ops.fp8_ops)
    core = fp8_fidelity.compare(fp8_fidelity.sample_all(core_model, cases, shapes_model.world, fidelity.STEPS), references)
    assert pack["min_psnr"] > 45.0 and pack["mean_ssim"] > 0.995
    # Half the root-mean-square error is 6 dB more PSNR.
    assert pack["mean_psnr"] > core["mean_psnr"] + 20 * math.log10(2), (pack, core)
