"""Every node of the pack on every model of ComfyUI's FLUX family, sampled through the real KSampler and
compared with the same model without the node: exactly where the node is exact, within its documented
error where it is not.

The family, as tiny models of ComfyUI's own classes (tests/support/flux_fixtures.py): FLUX.1; FLUX.1 Kontext
(the FLUX.1 model given a reference latent, as ComfyUI's ReferenceLatent node gives it); FLUX.2 (global
modulation, SwiGLU MLPs, no biases, four RoPE axes, patch size 1 on 128 channels), also with a
reference, and as klein (no guidance embedder); and Chroma (FLUX.1's blocks, modulations from its own
distilled guidance layer).
"""
import re

import pytest
import torch

from tests.support.flux_fixtures import TINY_FAMILY, WEIGHT_STD as WEIGHT_STD_OF_FIXTURES
from fluxaccel.nodes.context_parallel import pool as context_parallel_pool
from fluxaccel.nodes.attention import FluxAttentionBackend
from fluxaccel.nodes.compile import CompileFlux
from fluxaccel.nodes.context_parallel.node import ContextParallel
from tests.support.cache_reports import parse_compile_report
from tests.support.ksampler_helpers import (cache_summaries, conditioning, gpu_like_flux, ksample, relative_error,
                                            with_block_cache, with_cache)
from test_fp8_quantize import quantized

# name: (the tiny model's family, the reference latent's channels or None, its config beyond the family's)
MODELS = {
    "FLUX.1": ("flux1", None, {}),
    "FLUX.1 Kontext": ("flux1", 16, {}),
    "FLUX.2": ("flux2", None, {}),
    "FLUX.2 with a reference": ("flux2", 128, {}),
    "FLUX.2 klein": ("flux2", None, {"guidance_embed": False}),
    "Chroma": ("chroma", None, {}),
}
# 64 px: 4x4 token rows on FLUX.1 and Chroma (patch 2 of an 8x8 latent), 4x4 on FLUX.2 (patch 1, 16x downscale).
SIZE = 64
STEPS = 6
# fp32 on the CPU: another kernel or another order of the same sums.
FP32_ROUNDING = 1e-5
# FP8 Dynamic Quantize's error on the tiny models (tests/test_fp8_quantize.py holds FLUX.1 to the same).
FP8_ERROR = 1e-3
REUSING_THRESHOLD = 0.8
# Weights five times the fixtures' default: attention then singles out tokens, and a reference latent
# changes the picture by a few percent (at the default, by 1e-5: below what the comparisons resolve).
WEIGHT_STD = 0.1


def test_the_family_is_every_tiny_model_built():
    assert {family for family, _, _ in MODELS.values()} == set(TINY_FAMILY)


def reference_latent(channels, height=3, width=5, seed=4):
    return torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(seed))


def prompt(name, reference=None):
    """The prompt's CONDITIONING, with the model's reference latent (FLUX Kontext's) if it has one."""
    positive = conditioning(seed=1)
    channels = MODELS[name][1]
    if channels is not None:
        positive[0][1]["reference_latents"] = [reference if reference is not None else reference_latent(channels)]
    return positive


def model_of(name, **config):
    family, _, model_config = MODELS[name]
    return gpu_like_flux(family=family, **{"weight_std": WEIGHT_STD, **model_config, **config})


def sample(model, name, **settings):
    return ksample(model, prompt(name), size=SIZE, steps=STEPS, **settings)


@pytest.fixture(params=list(MODELS))
def name(request):
    return request.param


def test_a_reference_latent_changes_the_picture():
    for name in ("FLUX.1 Kontext", "FLUX.2 with a reference"):
        model = model_of(name)
        without = ksample(model, conditioning(seed=1), size=SIZE, steps=STEPS)
        assert relative_error(sample(model, name), without) > 0.01, name


def test_first_block_cache(name, caplog_info):
    model = model_of(name)
    expected = sample(model, name)
    assert torch.equal(sample(with_cache(model, 0.0), name), expected)
    reusing = sample(with_cache(model, REUSING_THRESHOLD), name)
    computed, total, reused = cache_summaries(caplog_info)[-1]
    assert reused > 0 and computed + reused == total == STEPS
    assert torch.isfinite(reusing).all()


def test_block_cache(name, caplog_info):
    model = model_of(name)
    expected = sample(model, name)
    assert torch.equal(sample(with_block_cache(model, 0.0, taylor_order=0), name), expected)
    # Three probe blocks (across the double/single split of the tiny models' 2 + 3) and a tail block.
    assert torch.equal(sample(with_block_cache(model, 0.0, taylor_order=2, probe_blocks=3, tail_blocks=1), name),
                       expected)
    predicted = sample(with_block_cache(model, 0.0, taylor_order=1, probe_blocks=2, tail_blocks=1, every_n_steps=2),
                       name)
    assert cache_summaries(caplog_info)[-1][2] > 0 and torch.isfinite(predicted).all()


def test_fp8_dynamic_quantize(name):
    # At the fixtures' weights, as tests/test_fp8_quantize.py's bound is for (the larger ones are chaotic
    # enough to make e4m3's rounding a 1.6 % difference after six steps).
    model = model_of(name, weight_std=WEIGHT_STD_OF_FIXTURES)
    assert 0 < relative_error(sample(quantized(model), name), sample(model, name)) < FP8_ERROR


def test_compile_flux(name):
    model = model_of(name)
    assert relative_error(sample(CompileFlux.execute(model, "default", "automatic").result[0], name),
                          sample(model, name)) < FP32_ROUNDING


@pytest.mark.parametrize("family", list(TINY_FAMILY))
def test_compile_flux_says_its_attention_input_pass_rewrote_every_compiled_block(family, caplog_info):
    """Each block graph holds one attention: the q/k norm + RoPE pass must have matched it in each (a pass
    that stops matching a model's block code shows as fewer sites). The FP8 passes need FP8 activations
    (a GPU of compute capability 8.9+): 0 here."""
    # A width no other test compiles, so that this run compiles the family's block graphs.
    model = CompileFlux.execute(gpu_like_flux(family=family, hidden_size=48), "default", "automatic").result[0]
    ksample(model, size=SIZE, steps=2)
    line = [message for record in caplog_info.records if (message := record.getMessage()).startswith("Compile FLUX:")][-1]
    graphs = parse_compile_report(line)
    # Graphs inductor found in its on-disk cache (an earlier process) are named in parentheses.
    assert graphs > 0 and re.search(
        rf"sites rewritten: {graphs} q/k norm \+ RoPE, 0 GELU into FP8 rows, 0 layer norm \+ modulation into FP8 "
        r"rows( \(\d+ of the graphs from inductor's cache[^)]*\))?, 0 graph breaks(; |$)", line), line


def test_compile_flux_compiles_nothing_for_a_third_reference_size(caplog_info):
    """Kontext's reference images come in any size: the second size makes the graphs size-generic."""
    name = "FLUX.1 Kontext"
    # A width no other test compiles, so that the first run compiles whatever ran before in the process.
    model = CompileFlux.execute(gpu_like_flux(hidden_size=112, weight_std=WEIGHT_STD), "default", "automatic").result[0]
    for height, width in ((3, 5), (4, 4), (2, 6)):
        ksample(model, prompt(name, reference_latent(16, height, width)), size=SIZE, steps=2)
    compiled = [graphs for record in caplog_info.records
                if (graphs := parse_compile_report(record.getMessage())) is not None]
    assert compiled[0] > 0 and compiled[2] == 0


def test_flux_attention_backend(name):
    model = model_of(name)
    assert relative_error(sample(FluxAttentionBackend.execute(model, "auto").result[0], name),
                          sample(model, name)) < FP32_ROUNDING


def across(model, gpus=2):
    return ContextParallel.execute(model, gpus, 0, 1, 0, False, "this machine").result[0]


# Two ranks: CPU processes on a machine without a GPU, two GPUs where ComfyUI has them.
needs_two_ranks = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                     reason="needs 2 GPUs here")


@needs_two_ranks
@pytest.mark.parametrize("name", [name for name in MODELS if name != "Chroma"])
def test_context_parallel_gives_the_single_process_output(name):
    model = model_of(name)
    try:
        assert relative_error(sample(across(model), name), sample(model, name)) < FP32_ROUNDING
    finally:
        context_parallel_pool.shutdown_pool()


def test_context_parallel_refuses_chroma_naming_what_it_supports():
    with pytest.raises(ValueError, match=r"Context Parallel \(multi-GPU\) supports FLUX.1 \(dev, schnell, Kontext\) "
                                         r"and FLUX.2 \(dev, klein\); this MODEL's diffusion model is Chroma"):
        across(model_of("Chroma"))


@needs_two_ranks
@pytest.mark.parametrize("method", ["uxo", "index_timestep_zero"])
def test_context_parallel_refuses_reference_placements_that_depend_on_the_image_size(method):
    name = "FLUX.1 Kontext"
    positive = prompt(name)
    positive[0][1]["reference_latents_method"] = method
    try:
        with pytest.raises(ValueError, match=f"reference latents placed by the '{method}' method are not supported"):
            ksample(across(model_of(name)), positive, size=SIZE, steps=2)
    finally:
        context_parallel_pool.shutdown_pool()
