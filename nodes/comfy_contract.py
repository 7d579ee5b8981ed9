"""Every ComfyUI detail the pack relies on that is not a documented extension point, in one place.

The nodes use ComfyUI's extension points directly: the V3 node API (`comfy_api.latest`), a
ModelPatcher's clone, wrappers, callbacks, patches and `model_options` (with `comfy.patcher_extension`'s
WrappersMP / CallbacksMP), `folder_paths`, and `comfy.model_management`'s device and interrupt.
Everything else they need — how a wrapper's arguments are ordered, private attributes, model classes
and the code protocol of their blocks, QuantizedTensor internals, comfy_kitchen's op names, core's
torch.compile wrapper, other modules' helpers — is reached through this
module (tests/test_pack_layout.py checks), and each such detail is a `Touchpoint`.

At load the pack checks every touchpoint (`problems`). A node whose touchpoints do not hold refuses to
run (`require`, called by its execute) with one line that names the ComfyUI version and what is
missing, instead of failing mid-sampling; where a missing detail only costs an optimisation, the node
runs without it and the line says so once. tests/test_comfy_contract.py holds a canary per touchpoint,
so a ComfyUI update fails the test that says what changed.
"""
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

FIRST_BLOCK_CACHE = "Apply First Block Cache"
BLOCK_CACHE = "Apply Block Cache"
FP8_QUANTIZE = "FP8 Dynamic Quantize"
COMPILE = "Compile FLUX"
CONTEXT_PARALLEL = "Context Parallel (multi-GPU)"
ATTENTION = "FLUX Attention Backend"
ALL_NODES = (FIRST_BLOCK_CACHE, BLOCK_CACHE, FP8_QUANTIZE, COMPILE, CONTEXT_PARALLEL, ATTENTION)
CACHE_NODES = (FIRST_BLOCK_CACHE, BLOCK_CACHE)


def comfyui_version() -> str:
    try:
        import comfyui_version as module
    except ImportError:
        return "unknown"
    return getattr(module, "__version__", "unknown")


# ---- the FLUX family's model classes and their forward ----

def flux_class():
    import comfy.ldm.flux.model
    return comfy.ldm.flux.model.Flux


def chroma_class():
    import comfy.ldm.chroma.model
    return comfy.ldm.chroma.model.Chroma


def model_classes(*getters) -> tuple:
    """The classes the getters return, less those this ComfyUI lacks (the flux-model-classes touchpoint)."""
    classes = []
    for getter in getters:
        try:
            classes.append(getter())
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def forward_parameters(diffusion_model) -> tuple:
    """The model's forward parameters that ComfyUI passes by position, in order: FLUX's are
    (x, timestep, context, y, guidance, ref_latents, control, transformer_options), Chroma's
    (x, timestep, context, guidance, control, transformer_options)."""
    return class_forward_parameters(type(diffusion_model))


@functools.lru_cache(maxsize=None)
def class_forward_parameters(model_class) -> tuple:
    # Read once per class: the wrappers ask at every model call, on the replayed path's host time.
    parameters = list(inspect.signature(model_class.forward).parameters.values())[1:]  # self
    return tuple(parameter for parameter in parameters if parameter.kind is parameter.POSITIONAL_OR_KEYWORD)


def forward_inputs(diffusion_model, args, kwargs) -> tuple[dict, dict]:
    """(the inputs by name, transformer_options) of a call of the model's forward as a DIFFUSION_MODEL
    wrapper gets it; the inputs also hold the call's keyword arguments (FLUX Kontext's ref_latents_method)."""
    inputs = {parameter.name: value for parameter, value in zip(forward_parameters(diffusion_model), args)}
    inputs.update(kwargs)
    return inputs, inputs.pop("transformer_options")


def forward_call(diffusion_model, inputs: dict, transformer_options) -> tuple[list, dict]:
    """(args, kwargs) that call the model's forward, or a DIFFUSION_MODEL executor, on `inputs` as
    ComfyUI does: its parameters by position (wrappers read them so), the rest by name."""
    named = {**inputs, "transformer_options": transformer_options}
    args = [named.pop(parameter.name, parameter.default) for parameter in forward_parameters(diffusion_model)]
    return args, named


def default_reference_method(diffusion_model) -> Optional[str]:
    """How the model places FLUX Kontext's reference latents when the conditioning does not say."""
    return getattr(getattr(diffusion_model, "params", None), "default_ref_method", None)


def pad_to_patch_size(x, patch):
    import comfy.ldm.common_dit
    return comfy.ldm.common_dit.pad_to_patch_size(x, (patch, patch))


# ---- the sampler's wrappers: their arguments by name ----

def calc_cond_batch_arguments(args, kwargs) -> dict:
    """A CALC_COND_BATCH wrapper's call (ComfyUI's `samplers._calc_cond_batch`) by argument name:
    model, conds, x_in, timestep, model_options."""
    import comfy.samplers
    return inspect.signature(comfy.samplers._calc_cond_batch).bind(*args, **kwargs).arguments


def outer_sample_arguments(args, kwargs) -> dict:
    """An OUTER_SAMPLE wrapper's call (ComfyUI's `CFGGuider.outer_sample`, its guider left out) by
    argument name: noise, latent_image, sampler, sigmas, ..."""
    import comfy.samplers
    signature = inspect.signature(comfy.samplers.CFGGuider.outer_sample)
    return signature.bind(None, *args, **kwargs).arguments


def guider_conds(guider):
    """A guider's processed conditioning for the run ({name: [cond dict]}), which its sampling reads."""
    return guider.conds


def set_guider_conds(guider, conds):
    guider.conds = conds


# ---- ModelPatcher and BaseModel internals ----

def model_options_clone(model_options):
    import comfy.model_patcher
    return comfy.model_patcher.create_model_options_clone(model_options)


def object_patches(model_patcher) -> dict:
    """The patcher's own {path: object} patches (a dict it owns after clone)."""
    return model_patcher.object_patches


def weight_patches(model_patcher) -> dict:
    """The patcher's own {key: [patch tuples]} weight patches (LoRA and the like)."""
    return model_patcher.patches


def set_loaded_size(model_patcher, size: int):
    """The bytes ComfyUI's loader plans for the model (it frees that much memory before loading)."""
    model_patcher.size = size


def module_size(module) -> int:
    import comfy.model_management
    return comfy.model_management.module_size(module)


def is_dynamic(model_patcher) -> bool:
    """Whether ComfyUI streams the model's weights per call (DynamicVRAM); releases without it never do."""
    return getattr(model_patcher, "is_dynamic", lambda: False)()


def loaded_partially(model) -> bool:
    """Whether ComfyUI loaded the model (a BaseModel) only partly onto its device (low VRAM)."""
    return bool(getattr(model, "model_lowvram", False))


def weight_patches_uuid(model):
    """What changes whenever ComfyUI patches the loaded weights anew (another LoRA strength)."""
    return model.current_weight_patches_uuid


def get_attr(module, path):
    import comfy.utils
    return comfy.utils.get_attr(module, path)


def set_parameter(module, path, tensor):
    import comfy.utils
    comfy.utils.set_attr_param(module, path, tensor)


def set_buffer(module, path, tensor):
    import comfy.utils
    comfy.utils.set_attr(module, path, tensor)


def weight_adapter_base():
    """ComfyUI's base class of weight patches (LoRA's), through which a node joins its patch merge."""
    import comfy.weight_adapter
    return comfy.weight_adapter.WeightAdapterBase


# ---- QuantizedTensor (comfy.quant_ops over comfy_kitchen) ----

def quantized_tensor_api():
    """(QuantizedLayout, QuantizedTensor, register_layout_class, register_layout_op, BaseLayoutParams,
    dequantize_args): what a new QuantizedTensor layout is made of."""
    from comfy.quant_ops import QuantizedLayout, QuantizedTensor, register_layout_class, register_layout_op
    from comfy_kitchen.tensor import BaseLayoutParams, dequantize_args
    return (QuantizedLayout, QuantizedTensor, register_layout_class, register_layout_op, BaseLayoutParams,
            dequantize_args)


def is_quantized_tensor(tensor) -> bool:
    """Whether `tensor` is one of ComfyUI's QuantizedTensors (the pack's FP8 weights, or a quantized checkpoint's)."""
    return isinstance(tensor, quantized_tensor_api()[1])


def quantized_data(qtensor):
    return qtensor._qdata


def quantized_params(qtensor):
    return qtensor._params


def quantized_layout_name(qtensor) -> str:
    return qtensor._layout_cls


# ---- core's torch.compile wrapper, which Compile FLUX hands the blocks it compiled ----

def set_compiled_modules(model_patcher, compiled_modules: dict, compile_kwargs: dict):
    """Swaps `compiled_modules` ({model path: module}) in for each model call and back after it: the APPLY_MODEL
    wrapper of core's `set_torch_compile_wrapper`, under its key (replacing core TorchCompileModel's), and the
    torch.compile arguments where core's function leaves them in model_options. Core's function compiles the
    modules itself, where Compile FLUX hooks its own."""
    import comfy.patcher_extension
    from comfy_api.torch_helpers import torch_compile
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    model_patcher.remove_wrappers_with_key(apply_model, torch_compile.COMPILE_KEY)
    model_patcher.add_wrapper_with_key(apply_model, torch_compile.COMPILE_KEY,
                                       torch_compile.apply_torch_compile_factory(compiled_modules))
    model_patcher.model_options[torch_compile.TORCH_COMPILE_KWARGS] = compile_kwargs


# ---- comfy_kitchen's RoPE ops, which Compile FLUX decomposes for inductor ----

def kitchen_rope_ops():
    """(apply_rope, apply_rope1) of comfy_kitchen as torch ops, or None where this ComfyUI has none."""
    ops = getattr(torch.ops, "comfy_kitchen", None)
    if ops is None or not hasattr(ops, "apply_rope") or not hasattr(ops, "apply_rope1"):
        return None
    return ops.apply_rope.default, ops.apply_rope1.default


# ---- the process's ComfyUI settings, which Context Parallel's workers take over ----

def cli_settings() -> dict:
    import comfy.cli_args
    return dict(vars(comfy.cli_args.args))


def apply_cli_settings(settings: dict):
    import comfy.cli_args
    vars(comfy.cli_args.args).update(settings)


def executing_context():
    """The prompt and node being executed (for reports on the sampler node), or None."""
    from comfy_execution.utils import get_executing_context
    return get_executing_context()


# ---- the touchpoints, checked at load ----

@dataclass(frozen=True)
class Touchpoint:
    name: str
    what: str  # the ComfyUI detail, as the disabled-node message names it
    check: Callable[[], Optional[str]]  # why it does not hold in this ComfyUI, or None
    needed_by: tuple = ()  # the nodes that cannot run without it
    optimisation: str = ""  # what is lost without it, where the nodes run on


def source_lacks(function, *fragments) -> Optional[str]:
    source = inspect.getsource(function)
    missing = [fragment for fragment in fragments if fragment not in source]
    return f"{function.__qualname__} no longer has {', '.join(map(repr, missing))}" if missing else None


def parameters_lack(function, *names) -> Optional[str]:
    present = list(inspect.signature(function).parameters)
    missing = [name for name in names if name not in present]
    return f"{function.__qualname__}{inspect.signature(function)} lacks {', '.join(missing)}" if missing else None


def attributes_lack(holder, *names) -> Optional[str]:
    missing = [name for name in names if not hasattr(holder, name)]
    return f"{getattr(holder, '__name__', holder)} has no {', '.join(missing)}" if missing else None


def check_block_protocol():
    # Chroma where this ComfyUI has it (the nodes then take it); FLUX always (flux_class raises without it).
    for model_class in (flux_class(), *model_classes(chroma_class)):
        problem = (source_lacks(model_class.forward_orig, 'patches_replace.get("dit"', '("double_block", i)',
                                '("single_block", i)', '"original_block"', 'transformer_options["block_index"]')
                   or source_lacks(model_class.__init__, "self.double_blocks = ", "self.single_blocks = "))
        if problem:
            return problem
    return None


def check_forward_parameters():
    return (parameters_lack(flux_class().forward, "x", "timestep", "context", "ref_latents", "transformer_options")
            or next(filter(None, (parameters_lack(chroma.forward, "x", "timestep", "context", "transformer_options")
                                  for chroma in model_classes(chroma_class))), None))


def check_post_input_patch():
    return source_lacks(flux_class().forward_orig, '"post_input"', '"img_ids"', '"txt_ids"')


def check_reference_latents():
    return (source_lacks(flux_class()._forward, "ref_latents_method", "default_ref_method", "process_img")
            or attributes_lack(flux_class(), "process_img"))


def check_calc_cond_batch():
    import comfy.samplers
    return parameters_lack(comfy.samplers._calc_cond_batch, "model", "conds", "x_in", "timestep", "model_options")


def check_outer_sample():
    import comfy.samplers
    return parameters_lack(comfy.samplers.CFGGuider.outer_sample, "noise", "latent_image", "sampler", "sigmas")


def check_guider_conds():
    import comfy.samplers
    return source_lacks(comfy.samplers.CFGGuider.outer_sample, "self.conds")


def check_model_patcher():
    import comfy.model_patcher
    return (source_lacks(comfy.model_patcher.ModelPatcher.__init__, "self.patches = {}", "self.object_patches = {}",
                         "self.size = size")
            or attributes_lack(comfy.model_patcher, "create_model_options_clone"))


def check_partial_load_flag():
    import comfy.model_patcher
    return source_lacks(comfy.model_patcher.ModelPatcher.__init__, "model_lowvram")


def check_weight_patches_uuid():
    import comfy.model_patcher
    return source_lacks(comfy.model_patcher.ModelPatcher.__init__, "current_weight_patches_uuid")


def check_quantized_tensors():
    try:
        QuantizedLayout, QuantizedTensor, *_ = quantized_tensor_api()
    except ImportError as error:
        return str(error)
    return (source_lacks(QuantizedTensor.__init__, "_qdata", "_params", "_layout_cls")
            or attributes_lack(QuantizedLayout, "quantize", "dequantize", "get_plain_tensors"))


def check_weight_adapter():
    try:
        weight_adapter_base()
    except (ImportError, AttributeError) as error:
        return str(error)
    return None


def check_kitchen_rope_ops():
    return None if kitchen_rope_ops() is not None else "torch.ops.comfy_kitchen has no apply_rope / apply_rope1"


def check_helpers():
    import comfy.ldm.common_dit
    import comfy.model_management
    import comfy.utils
    return (attributes_lack(comfy.utils, "get_attr", "set_attr", "set_attr_param")
            or attributes_lack(comfy.ldm.common_dit, "pad_to_patch_size")
            or attributes_lack(comfy.model_management, "module_size"))


def check_compile_wrapper():
    from comfy_api.torch_helpers import torch_compile
    return (attributes_lack(torch_compile, "COMPILE_KEY", "TORCH_COMPILE_KWARGS", "apply_torch_compile_factory")
            or parameters_lack(torch_compile.apply_torch_compile_factory, "compiled_module_dict"))


def check_cli_args():
    import comfy.cli_args
    return attributes_lack(comfy.cli_args, "args")


def check_executing_context():
    try:
        executing_context()
    except ImportError as error:
        return str(error)
    return None


TOUCHPOINTS = (
    Touchpoint("flux-block-protocol", "FLUX's and Chroma's blocks called through patches_replace['dit']",
               check_block_protocol, (FIRST_BLOCK_CACHE, BLOCK_CACHE, COMPILE, CONTEXT_PARALLEL)),
    Touchpoint("flux-forward-parameters", "the FLUX forward's parameter names", check_forward_parameters,
               (COMPILE, CONTEXT_PARALLEL)),
    Touchpoint("flux-post-input-patch", "FLUX's patches['post_input'] hook", check_post_input_patch,
               (CONTEXT_PARALLEL,)),
    Touchpoint("flux-reference-latents", "FLUX Kontext's reference latents in Flux._forward",
               check_reference_latents, (CONTEXT_PARALLEL,)),
    Touchpoint("calc-cond-batch-arguments", "samplers._calc_cond_batch's arguments", check_calc_cond_batch,
               CACHE_NODES),
    Touchpoint("outer-sample-arguments", "CFGGuider.outer_sample's arguments", check_outer_sample, (BLOCK_CACHE,)),
    Touchpoint("guider-conds", "CFGGuider.conds during sampling", check_guider_conds,
               (FIRST_BLOCK_CACHE, BLOCK_CACHE, FP8_QUANTIZE, COMPILE, ATTENTION)),
    Touchpoint("model-patcher-internals", "ModelPatcher.patches / object_patches / size", check_model_patcher,
               (FP8_QUANTIZE, FIRST_BLOCK_CACHE, BLOCK_CACHE, CONTEXT_PARALLEL)),
    Touchpoint("partial-load-flag", "BaseModel.model_lowvram", check_partial_load_flag, (CONTEXT_PARALLEL,)),
    Touchpoint("weight-patches-uuid", "BaseModel.current_weight_patches_uuid", check_weight_patches_uuid,
               (CONTEXT_PARALLEL,)),
    Touchpoint("quantized-tensors", "comfy.quant_ops QuantizedTensor layouts", check_quantized_tensors,
               (FP8_QUANTIZE,)),
    Touchpoint("weight-adapter", "comfy.weight_adapter.WeightAdapterBase", check_weight_adapter, (FP8_QUANTIZE,)),
    Touchpoint("comfy-helpers", "comfy.utils / common_dit / model_management helpers", check_helpers,
               (FP8_QUANTIZE, CONTEXT_PARALLEL)),
    Touchpoint("torch-compile-wrapper", "comfy_api.torch_helpers.torch_compile's apply_torch_compile_factory",
               check_compile_wrapper, (COMPILE,)),
    Touchpoint("cli-args", "comfy.cli_args.args", check_cli_args, (CONTEXT_PARALLEL,)),
    Touchpoint("kitchen-rope-ops", "comfy_kitchen's apply_rope ops", check_kitchen_rope_ops,
               optimisation="Compile FLUX leaves ComfyUI's RoPE as it is (a kernel and host dispatch per block)"),
    Touchpoint("executing-context", "comfy_execution.utils.get_executing_context", check_executing_context,
               optimisation="the nodes' reports go to ComfyUI's log only, not onto the sampler node"),
)


@functools.lru_cache(maxsize=None)
def problems() -> dict:
    """{touchpoint name: why it does not hold} in this ComfyUI (checked once per process)."""
    found = {}
    for touchpoint in TOUCHPOINTS:
        try:
            problem = touchpoint.check()
        except Exception as error:  # a changed module can fail in any way: that is the finding
            problem = f"{type(error).__name__}: {error}"
        if problem:
            found[touchpoint.name] = problem
    return found


def report_at_load():
    """One log line per node this ComfyUI disables, and per optimisation it costs."""
    for node, problem in sorted(node_problems().items()):
        logging.warning("comfyui-fluxaccel: %s", problem)
    for touchpoint in TOUCHPOINTS:
        if touchpoint.optimisation and touchpoint.name in problems():
            logging.warning("comfyui-fluxaccel on ComfyUI %s: %s (%s: %s)", comfyui_version(), touchpoint.optimisation,
                            touchpoint.what, problems()[touchpoint.name])


def node_problems() -> dict:
    """{node name: its disabled-node message} for the nodes whose touchpoints do not hold."""
    messages = {}
    for touchpoint in TOUCHPOINTS:
        if touchpoint.name not in problems():
            continue
        for node in touchpoint.needed_by:
            messages.setdefault(node, f"{node} is disabled on ComfyUI {comfyui_version()}: {touchpoint.what} changed "
                                      f"({problems()[touchpoint.name]}). Update comfyui-fluxaccel, or use the "
                                      "ComfyUI version its README names.")
    return messages


def require(node_name):
    """Raises the node's disabled-node message (a ValueError: the prompt fails before sampling) where
    this ComfyUI lacks a touchpoint the node needs."""
    message = node_problems().get(node_name)
    if message is not None:
        raise ValueError(message)
