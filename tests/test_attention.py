"""FLUX Attention Backend through ComfyUI's real attention call, ModelPatcher and KSampler (CPU).

On the CPU every backend order reaches the same SDPA kernel, so the node must reproduce ComfyUI's own
SDPA attention exactly; which kernel a GPU picks is measured in docs/LAB-NOTEBOOK.md.
"""
import pytest
import torch

import comfy.ldm.modules.attention
from conftest import cpu_machine_only
from tests.support.flux_fixtures import tiny_flux_patcher
from fluxaccel.kernels.attention.backends import BACKEND_ORDERS, auto_backend
from fluxaccel.nodes.attention import OVERRIDE_KEY, AttentionOnBackend, FluxAttentionBackend, attention_backend
from fluxaccel.nodes.compile import CompileFlux
from tests.support.ksampler_helpers import gpu_like_flux, ksample, relative_error

FP32_ROUNDING = 1e-5


def with_backend(model, backend="auto"):
    return FluxAttentionBackend.execute(model, backend).result[0]


def comfy_attention_call(attention, q, k, v, heads, **kwargs):
    """How ComfyUI's attention functions are called, through their wrapper, with an override in place."""
    return attention(q, k, v, heads, transformer_options={OVERRIDE_KEY: AttentionOnBackend("cudnn")}, **kwargs)


MASKS = {
    "none": None,
    "tokens x tokens": torch.randn(7, 7),
    "batch": torch.randn(2, 7, 7),
    "batch and heads": torch.randn(2, 3, 7, 7),
}


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("heads_first", [True, False], ids=["flux-layout", "tokens-layout"])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_the_override_computes_comfyuis_sdpa_attention(mask, heads_first, skip_output_reshape):
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    if not heads_first:
        q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))
    kwargs = dict(mask=mask, skip_reshape=heads_first, skip_output_reshape=skip_output_reshape)
    expected = comfy.ldm.modules.attention.attention_pytorch(q, k, v, 3, **kwargs)
    actual = comfy_attention_call(comfy.ldm.modules.attention.attention_basic, q, k, v, 3, **kwargs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("heads_first", [True, False], ids=["flux-layout", "tokens-layout"])
def test_grouped_query_attention_passes_through(heads_first):
    q, (k, v) = torch.randn(1, 4, 7, 8), torch.randn(2, 1, 2, 7, 8).unbind(0)
    # ComfyUI's SDPA on the heads-first tensors, whose output is [batch, tokens, heads * dim] in both
    # layouts: before 0.27.0 its tokens-layout path split k and v by the query's head count and failed.
    expected = comfy.ldm.modules.attention.attention_pytorch(q, k, v, 4, skip_reshape=True, enable_gqa=True)
    if not heads_first:
        q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))
    kwargs = dict(skip_reshape=heads_first, enable_gqa=True)
    torch.testing.assert_close(comfy_attention_call(comfy.ldm.modules.attention.attention_basic, q, k, v, 4, **kwargs),
                               expected)


@pytest.mark.parametrize("backend", BACKEND_ORDERS)
def test_sampling_matches_comfyuis_sdpa_attention_on_every_backend(backend):
    expected = ksample(gpu_like_flux())
    assert relative_error(ksample(with_backend(tiny_flux_patcher(), backend)), expected) < FP32_ROUNDING


def test_compiled_with_no_graph_break_and_no_recompile_between_runs(caplog_info):
    model = with_backend(tiny_flux_patcher())
    expected = ksample(model)
    compiled = CompileFlux.execute(model, "default", "automatic").result[0]
    assert relative_error(ksample(compiled), expected) < FP32_ROUNDING
    ksample(compiled, seed=3)
    reports = [record.getMessage() for record in caplog_info.records if record.getMessage().startswith("Compile FLUX")]
    assert reports[-2].partition("; ")[0].endswith(", 0 graph breaks")
    assert reports[-1].startswith("Compile FLUX: no graph compiled this run (all shapes seen before)")


@cpu_machine_only
def test_auto_keeps_comfyuis_order_where_cudnn_was_not_measured_faster():
    assert auto_backend("cpu") == "flash"
    assert attention_backend(with_backend(tiny_flux_patcher()).model_options) == "flash"


def test_applied_twice_the_last_choice_holds_and_the_input_model_is_untouched():
    model = tiny_flux_patcher()
    twice = with_backend(with_backend(model, "cudnn"), "efficient")
    assert attention_backend(twice.model_options) == "efficient"
    assert OVERRIDE_KEY not in model.model_options["transformer_options"]


def test_non_flux_model_gets_a_clear_error():
    model = tiny_flux_patcher()
    model.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError,
                       match="FLUX Attention Backend supports FLUX.1 .dev, schnell, Kontext., FLUX.2 .*diffusion model is Linear"):
        with_backend(model)
