"""FP8 Dynamic Quantize through ComfyUI's real ModelPatcher, loader and KSampler (CPU: weight-only FP8)."""
import gc
import itertools
import weakref

import pytest
import torch

import comfy.lora
import comfy.model_management
import comfy.utils
from conftest import cpu_machine_only
from tests.support.flux_fixtures import tiny_flux_patcher
from fluxaccel.kernels.fp8 import quantize as fp8
from fluxaccel.nodes import flux_layout
from fluxaccel.nodes.compile import CompileFlux
from fluxaccel.nodes.fp8_layout import is_fp8_weight, quantize_weight
from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize, FP8Marker, QuantizingSetWeight
from tests.support.ksampler_helpers import cache_summaries, gpu_like_flux, ksample, relative_error, tiny_lora, with_cache, with_lora

TINY_FLUX_LINEAR_LAYERS = 39
TINY_FLUX_KEPT = ["img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                  "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "final_layer.linear",
                  "final_layer.adaLN_modulation.1"]


def quantized(model, activation_scaling="per-row", exclude=""):
    return FP8DynamicQuantize.execute(model, activation_scaling, exclude).result[0]


def linear_layers(patcher):
    diffusion_model = patcher.model.diffusion_model
    return {name: diffusion_model.get_submodule(name) for name in fp8.linear_layer_names(diffusion_model)}


def weight_bytes(weight):
    """A weight as exactly comparable tensors: FP8 data bits and scales, or the float weight."""
    if is_fp8_weight(weight):
        return ("fp8", weight._qdata.view(torch.uint8).clone(), weight._params.scale.clone(), weight.dtype)
    return ("float", weight.detach().clone(), weight.dtype)


def loaded_weights(patcher):
    """Every linear weight of the diffusion model as ComfyUI loads it for sampling; unloads after."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        return {name: weight_bytes(layer.weight) for name, layer in linear_layers(patcher).items()}
    finally:
        comfy.model_management.unload_all_models()


def same_weights(actual, expected):
    return actual.keys() == expected.keys() and all(
        len(a) == len(e) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, e))
        for a, e in ((actual[k], expected[k]) for k in expected))


def lora_with_an_excluded_layer(model):
    lora = tiny_lora(model)
    generator = torch.Generator().manual_seed(9)
    weight = model.get_model_object("diffusion_model.img_in").weight
    lora["diffusion_model.img_in.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=generator)
    lora["diffusion_model.img_in.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=generator)
    return lora


def expected_fp8_weights(float_weights, targets):
    """What the node must load: the targets quantized from the given float weights as ComfyUI hands a patched
    weight over (a copy in its patch-merge dtype, cast back to the weight's), the rest as they are."""
    merge_dtype = comfy.model_management.lora_compute_dtype(comfy.model_management.get_torch_device())
    expected = {}
    for name, entry in float_weights.items():
        weight = entry[1]
        if name in targets:
            qdata, scale = fp8.quantize_rows(weight.to(merge_dtype).to(weight.dtype))
            expected[name] = ("fp8", qdata.view(torch.uint8), scale, weight.dtype)
        else:
            expected[name] = entry
    return expected


@pytest.fixture(params=["this machine's", "float16"])
def lora_compute_dtype(request, monkeypatch):
    """The dtype ComfyUI merges weight patches in, and so hands the node every target weight in (the node's
    marker is a patch): its own choice for this machine (float32 on a CPU), and float16, its choice on GPUs of
    compute capability 8 and up, where a bf16 weight's values below float16's range lose precision."""
    if request.param == "float16":
        monkeypatch.setattr(comfy.model_management, "lora_compute_dtype", lambda device: torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loads_fp8_targets_keeps_sensitive_layers_and_restores_everything(dtype, lora_compute_dtype):
    model = tiny_flux_patcher(dtype=dtype)
    before_sampling = ksample(model)
    original = {name: weight_bytes(layer.weight) for name, layer in linear_layers(model).items()}
    patched = quantized(model)

    weights = loaded_weights(patched)
    targets = {name for name, entry in weights.items() if entry[0] == "fp8"}
    assert len(weights) == TINY_FLUX_LINEAR_LAYERS
    assert sorted(set(weights) - targets) == sorted(TINY_FLUX_KEPT)
    assert same_weights(weights, expected_fp8_weights(original, targets))
    assert all(weights[name][3] == dtype for name in targets), "FP8 weights report the model's dtype"

    fp8_sample = ksample(patched)
    assert 0 < relative_error(fp8_sample, before_sampling) < 1e-3
    comfy.model_management.unload_all_models()
    assert same_weights({name: weight_bytes(layer.weight) for name, layer in linear_layers(model).items()}, original)
    assert not any(hasattr(layer, "set_weight") for layer in linear_layers(model).values())
    assert not model.patches and not model.object_patches, "the input MODEL is untouched"
    assert torch.equal(ksample(model), before_sampling)


def test_lora_before_or_after_gives_the_quantized_merged_model(lora_compute_dtype):
    model = tiny_flux_patcher(dtype=torch.bfloat16)
    lora = lora_with_an_excluded_layer(model)
    lora_first = quantized(with_lora(model, lora, 0.8))
    lora_after = with_lora(quantized(model), lora, 0.8)

    merged = loaded_weights(with_lora(model, lora, 0.8))
    first_weights = loaded_weights(lora_first)
    targets = {name for name, entry in first_weights.items() if entry[0] == "fp8"}
    assert same_weights(first_weights, expected_fp8_weights(merged, targets))
    assert same_weights(loaded_weights(lora_after), first_weights)
    assert not torch.equal(merged["img_in"][1], loaded_weights(model)["img_in"][1]), "the LoRA reaches excluded layers"
    assert torch.equal(ksample(lora_first), ksample(lora_after))


def test_requantizes_when_the_lora_changes_and_after_other_clones():
    model = tiny_flux_patcher(dtype=torch.bfloat16)
    lora = tiny_lora(model)
    plain = quantized(model)
    plain_weights = loaded_weights(plain)
    half, full = loaded_weights(with_lora(plain, lora, 0.5)), loaded_weights(with_lora(plain, lora, 1.0))
    assert not torch.equal(half["double_blocks.0.img_attn.qkv"][1], full["double_blocks.0.img_attn.qkv"][1])
    assert torch.equal(half["double_blocks.1.img_attn.qkv"][1], full["double_blocks.1.img_attn.qkv"][1])
    assert same_weights(loaded_weights(plain), plain_weights), "a clone used after LoRA clones gets its own weights"


def test_applying_twice_replaces_the_settings():
    model = tiny_flux_patcher()
    twice = quantized(quantized(model, "per-tensor"), "per-row", "single_blocks.0, *.txt_mlp.2")
    markers = [patch for patches in twice.patches.values() for patch in patches if isinstance(patch[1], FP8Marker)]
    hooks = [patch for patch in twice.object_patches.values() if isinstance(patch, QuantizingSetWeight)]
    weights = loaded_weights(twice)
    targets = {name for name, entry in weights.items() if entry[0] == "fp8"}
    assert len(markers) == len(hooks) == len(targets) == TINY_FLUX_LINEAR_LAYERS - len(TINY_FLUX_KEPT) - 3 - 2
    assert not any(name.startswith("single_blocks.0.") or name.endswith("txt_mlp.2") for name in targets)
    assert {hook.activation_scaling for hook in hooks} == {"row"}
    assert relative_error(ksample(twice), ksample(model)) < 1e-3


def test_tells_the_loader_the_fp8_size():
    model = tiny_flux_patcher()
    patched = quantized(model)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    try:
        layers = linear_layers(patched).values()
        scales = sum(layer.weight._params.scale.nbytes for layer in layers if is_fp8_weight(layer.weight))
        assert patched.model_size() == comfy.model_management.module_size(patched.model) + scales
        assert patched.model_size() < 0.4 * model.model_size()
    finally:
        comfy.model_management.unload_all_models()


def test_a_model_dropped_while_loaded_frees_its_fp8_weights_without_garbage_collection():
    """ComfyUI drops a patcher when the graph changes and unloads it later: nothing may keep its weights."""
    patched = quantized(tiny_flux_patcher())
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    fp8_data = weakref.ref(patched.model.diffusion_model.double_blocks[0].img_attn.qkv.weight._qdata)
    gc.disable()
    try:
        del patched
        comfy.model_management.unload_all_models()
        assert fp8_data() is None
    finally:
        gc.enable()


def test_a_clone_on_another_module_tree_quantizes_that_tree():
    """ComfyUI's multi-GPU and non-dynamic copies clone a patcher onto a copy of the model."""
    model = tiny_flux_patcher()
    patched = quantized(model)
    copy = tiny_flux_patcher()
    on_copy = patched.clone(model_override=copy.get_clone_model_override())
    comfy.model_management.load_models_gpu([on_copy], force_full_load=True)
    try:
        assert is_fp8_weight(copy.model.diffusion_model.double_blocks[0].img_attn.qkv.weight)
        assert not is_fp8_weight(model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight)
    finally:
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("cache_first", [True, False])
def test_composes_with_first_block_cache_in_either_order(cache_first, caplog_info):
    model = tiny_flux_patcher()
    expected = ksample(with_cache(quantized(model), 0.8), steps=8)
    reuse = cache_summaries(caplog_info)[-1]
    stacked = quantized(with_cache(model, 0.8)) if cache_first else with_cache(quantized(model), 0.8)
    assert torch.equal(ksample(stacked, steps=8), expected)
    assert cache_summaries(caplog_info)[-1] == reuse and reuse[2] > 0


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("input_shape", [(5, 32), (2, 7, 32)])
def test_linear_on_an_fp8_weight_is_the_fp8_kernel(with_bias, input_shape, monkeypatch):
    """torch.nn.functional.linear reaches the layout as aten.t then aten.addmm (with bias) or aten.mm,
    which run the kernel on the FP8 data (not a dequantized fallback)."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(48, 32, generator=generator) * 0.2
    bias = torch.randn(48, generator=generator) if with_bias else None
    x = torch.randn(*input_shape, generator=generator)
    fp8_weight = torch.nn.Parameter(quantize_weight(weight, torch.float32, "row"), requires_grad=False)
    qdata, scale = fp8.quantize_rows(weight)
    expected = fp8.fp8_linear(x, qdata, scale, bias)
    kernel_calls = []
    kernel = fp8.fp8_linear
    monkeypatch.setattr(fp8, "fp8_linear", lambda *args: kernel_calls.append(args) or kernel(*args))
    assert torch.equal(torch.nn.functional.linear(x, fp8_weight, bias).reshape(expected.shape), expected)
    [(_, kernel_qdata, _, _, activation_scaling)] = kernel_calls
    assert kernel_qdata is fp8_weight._qdata and activation_scaling == "row"


STACK_NODES = {
    "fp8": quantized,
    "compile": lambda model: CompileFlux.execute(model, "default", "automatic").result[0],
    "cache": lambda model: with_cache(model, 0.8),
}


def test_every_order_of_the_three_nodes_and_a_lora_gives_the_same_picture(caplog_info):
    model = gpu_like_flux()
    lora = tiny_lora(model)
    expected = ksample(with_cache(quantized(with_lora(model, lora, 0.7)), 0.8), steps=8)
    expected_reuse = cache_summaries(caplog_info)[-1]
    assert expected_reuse[2] > 0
    for order in itertools.permutations(STACK_NODES):
        for lora_first in (True, False):
            stacked = with_lora(model, lora, 0.7) if lora_first else model
            for node in order:
                stacked = STACK_NODES[node](stacked)
            if not lora_first:
                stacked = with_lora(stacked, lora, 0.7)
            error = relative_error(ksample(stacked, steps=8), expected)
            assert error < 1e-5, f"{' -> '.join(order)}, LoRA {'first' if lora_first else 'last'}: {error}"
            assert cache_summaries(caplog_info)[-1] == expected_reuse


def test_compiles_with_compile_flux():
    model = gpu_like_flux()
    eager = ksample(quantized(model), steps=3)
    assert relative_error(ksample(CompileFlux.execute(quantized(model), "default", "automatic").result[0], steps=3),
                          eager) < 1e-5


@cpu_machine_only
def test_reports_weight_only_fp8_without_fp8_tensor_cores(caplog_info):
    quantized(tiny_flux_patcher())
    message = caplog_info.records[-1].getMessage()
    assert message.startswith("FP8 Dynamic Quantize: 29 linear layers to FP8 (weight-only: cpu has no FP8 tensor cores")
    assert message.endswith("10 kept: " + ", ".join(TINY_FLUX_KEPT))


def test_non_flux_model_gets_a_clear_error():
    model = tiny_flux_patcher()
    model.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError,
                       match="FP8 Dynamic Quantize supports FLUX.1 .dev, schnell, Kontext., FLUX.2 .*diffusion model is Linear"):
        quantized(model)


@pytest.mark.parametrize("activation_scaling, exclude, message", [
    ("per-block", "", "activation_scaling must be one of per-row, per-tensor, not 'per-block'"),
    ("per-row", "double_blocks.0.img_attn.qkv, single_block.*", "exclude pattern 'single_block.\\*' matches no linear layer"),
])
def test_bad_options_get_a_clear_error(activation_scaling, exclude, message):
    with pytest.raises(ValueError, match=message):
        quantized(tiny_flux_patcher(), activation_scaling, exclude)


def test_the_exclude_text_is_read_as_patterns_never_run(tmp_path):
    """The node's only free-text input comes from workflow files, which are data."""
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(ValueError, match="matches no linear layer"):
        quantized(tiny_flux_patcher(), "per-row", code)
    assert not marker.exists()


def test_weights_stored_in_fp8_are_refused():
    model = tiny_flux_patcher()
    model.model.diffusion_model.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="quantizes bf16/fp16/fp32 weights; .* is stored as torch.float8_e4m3fn"):
        quantized(model)


def scaled_fp8_tiny_flux():
    """The tiny FLUX as ComfyUI loads a scaled-FP8 checkpoint (a `scaled_fp8` marker and a `scale_weight` per
    layer): comfy.sd.load_diffusion_model_state_dict's steps, whose weights become QuantizedTensors."""
    import comfy.model_patcher
    import comfy.supported_models
    from tests.support.flux_fixtures import TINY_FAMILY

    source = tiny_flux_patcher(dtype=torch.bfloat16).model.diffusion_model.state_dict()
    state_dict = {"scaled_fp8": torch.empty((), dtype=torch.float8_e4m3fn)}
    for name, tensor in source.items():
        if name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().amax().float() / torch.finfo(torch.float8_e4m3fn).max
            state_dict[name] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            state_dict[name.removesuffix("weight") + "scale_weight"] = scale
        else:
            state_dict[name] = tensor
    state_dict, _ = comfy.utils.convert_old_quants(state_dict, "", metadata={})
    make_unet_config, supported_model = TINY_FAMILY["flux1"]
    config = getattr(comfy.supported_models, supported_model)(make_unet_config())
    config.quant_config = comfy.utils.detect_layer_quantization(state_dict, "")
    device = comfy.model_management.get_torch_device()
    unet_dtype = comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(state_dict),
                                                   supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(unet_dtype, comfy.model_management.unet_manual_cast(None, device,
                                                                                  config.supported_inference_dtypes))
    model = config.get_model(state_dict, "")
    model.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def test_a_scaled_fp8_checkpoint_is_refused_as_quantized_by_comfyui():
    model = scaled_fp8_tiny_flux()
    assert type(model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight).__name__ == "QuantizedTensor"
    with pytest.raises(ValueError, match=r"this model is already quantized by ComfyUI \(double_blocks\.0\.\S+\.weight "
                                         r"holds torch.float8_e4m3fn data in ComfyUI's TensorCoreFP8E4M3Layout, .*"
                                         r"scaled-FP8 .*Use the model as it is, without this node .*or load the bf16 "
                                         r"checkpoint with Load Diffusion Model's weight_dtype 'default'"):
        quantized(model)


def test_sensitive_layers_are_flux_input_and_output_layers():
    names = fp8.linear_layer_names(tiny_flux_patcher().model.diffusion_model)
    _, kept = fp8.select_layers(names, flux_layout.FP8_SENSITIVE_LAYERS)
    assert sorted(kept) == sorted(TINY_FLUX_KEPT)
