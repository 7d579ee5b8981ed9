"""FP8 Dynamic Quantize: FLUX's linear layers on FP8 e4m3 weights and activations with dynamic scales.

Hook-up, on the node's clone only (the input MODEL and its other clones never change):
- each target layer gets an object patch `diffusion_model.<layer>.set_weight`. ComfyUI's loader
  (`ModelPatcher.patch_weight_to_device`) hands a layer's fully patched weight (the original plus
  every LoRA, in whatever order they were added) to the module's `set_weight` when it has one, so
  the FP8 weight is quantized from exactly the weight the unquantized model would run, once per
  load. `unpatch_model` puts the original weight back from ComfyUI's backup and removes the attribute.
- each target weight gets an identity weight patch (`FP8Marker`), because the loader only calls
  `patch_weight_to_device` for weights that have patches. Being the identity, where it sits among
  the LoRA patches does not matter.
- an ON_CLONE callback points the `set_weight` hooks of a clone made on another module tree (a
  multi-GPU or non-dynamic copy) at that tree's layers.
Layers ComfyUI leaves offloaded in a partial (lowvram) load are not quantized: they run in the
model's dtype with the LoRA applied per call, as without this node. The node tells the loader the
FP8 size of the model, so a model that fits in FP8 is loaded whole.
"""
import weakref

import torch
from typing_extensions import override

import comfy.patcher_extension
from comfy_api.latest import ComfyExtension, io

from ..kernels.fp8 import quantize as fp8
from . import CATEGORY, comfy_contract, flux_layout
from .fp8_layout import is_fp8_weight, quantize_weight
from .patcher_hooks import keep_conds_on_device, non_dynamic_clone, set_callback
from .reporting import report_run

NODE_NAME = comfy_contract.FP8_QUANTIZE
CALLBACK_KEY = "fluxaccel.fp8"
ACTIVATION_SCALING_OPTIONS = {"per-row": "row", "per-tensor": "tensor"}
FLOAT_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FP8Marker(comfy_contract.weight_adapter_base()):
    """The identity weight patch that makes ComfyUI's loader send a target weight to its `set_weight`."""

    name = "fluxaccel_fp8_marker"

    def calculate_weight(self, weight, *args, **kwargs):
        return weight


class QuantizingSetWeight:
    """A target layer's `set_weight` while the patched model is loaded: keeps the merged weight as FP8."""

    def __init__(self, layer_path, layer, activation_scaling):
        self.layer_path = layer_path
        # Weak: the layer holds this object as its `set_weight` while loaded, and a strong reference
        # back would keep a model whose patcher was dropped before unloading alive until a garbage
        # collection, with its FP8 weights in VRAM.
        self.layer_ref = weakref.ref(layer)
        self.activation_scaling = activation_scaling

    @property
    def layer(self):
        return self.layer_ref()

    def on_model(self, model):
        """The same hook for the layer at the same path in another copy of the model."""
        return QuantizingSetWeight(self.layer_path, comfy_contract.get_attr(model, self.layer_path), self.activation_scaling)

    def __call__(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        # ComfyUI itself stores a patched float weight as the merge cast to the model's dtype; the
        # FP8 weight is quantized from exactly that (the cast happens block by block, saving VRAM).
        # On GPUs of compute capability 8 and up ComfyUI merges in float16, so a bf16 weight's values
        # below float16's range arrive rounded (in the tests, a few FP8 values per layer one step off);
        # quantizing the layer's own weight instead would send every weight to the GPU a second time.
        layer = self.layer
        dtype = layer.weight.dtype
        if return_weight:
            # Saving or extracting a LoRA from the model wants the float weights, not the FP8 ones.
            return weight.to(dtype)
        if inplace_update:
            raise ValueError(f"{NODE_NAME} cannot run on a model loaded with in-place weight updates.")
        if is_fp8_weight(layer.weight):
            raise RuntimeError(f"{NODE_NAME}: {self.layer_path} already holds FP8 weights; quantizing them "
                               "again would compound the error. Report this with your workflow.")
        layer.weight = torch.nn.Parameter(quantize_weight(weight, dtype, self.activation_scaling), requires_grad=False)


def retarget_hooks_on_clone(original, clone):
    """ON_CLONE: a clone made on another module tree quantizes that tree's layers, not the original's."""
    if clone.model is original.model:
        return
    patches = comfy_contract.object_patches(clone)
    for key, patch in list(patches.items()):
        if isinstance(patch, QuantizingSetWeight):
            patches[key] = patch.on_model(clone.model)


def parse_exclusions(text):
    return [pattern.strip() for pattern in text.replace("\n", ",").split(",") if pattern.strip()]


def select_target_layers(diffusion_model, extra_exclusions):
    """(layers to quantize, layers kept), as paths under the diffusion model."""
    layer_names = fp8.linear_layer_names(diffusion_model)
    for pattern in extra_exclusions:
        if not any(fp8.matches_any(name, [pattern]) for name in layer_names):
            raise ValueError(f"{NODE_NAME}: exclude pattern '{pattern}' matches no linear layer of this model; "
                             "layer names look like double_blocks.0.img_attn.qkv or single_blocks.12.linear2.")
    return fp8.select_layers(layer_names, list(flux_layout.FP8_SENSITIVE_LAYERS) + extra_exclusions)


def check_not_quantized_by_comfyui(diffusion_model):
    """Refuses a model ComfyUI loaded quantized (a scaled-FP8 file, say). Its layers are ComfyUI's mixed-precision
    ops, no torch.nn.Linear, so without this check the node would find no layer to quantize and say only that."""
    for path, weight in diffusion_model.named_parameters():
        if comfy_contract.is_quantized_tensor(weight) and not is_fp8_weight(weight):
            # Such a weight reports its compute dtype (bf16, say) as its dtype: name the storage instead.
            raise ValueError(
                f"{NODE_NAME}: this model is already quantized by ComfyUI ({path} holds "
                f"{comfy_contract.quantized_data(weight).dtype} data in ComfyUI's "
                f"{comfy_contract.quantized_layout_name(weight)}, as loaded from a scaled-FP8 or other quantized "
                "checkpoint); quantizing it again would compound the error. Use the model as it is, without this node (ComfyUI "
                "runs its FP8 weights itself), or load the bf16 checkpoint with Load Diffusion Model's weight_dtype "
                "'default' to use this node.")


def check_float_weights(diffusion_model, targets):
    for path in targets:
        weight = comfy_contract.get_attr(diffusion_model, path).weight
        if is_fp8_weight(weight):
            continue
        if weight.dtype not in FLOAT_WEIGHT_DTYPES or type(weight) is not torch.nn.Parameter:
            raise ValueError(
                f"{NODE_NAME} quantizes bf16/fp16/fp32 weights; {path} is stored as {weight.dtype} "
                f"({type(weight).__name__}). Load the model with Load Diffusion Model's weight_dtype 'default' "
                "from a bf16 checkpoint.")


def remove_fp8_hooks(patcher):
    """Undoes an earlier application of this node on the same model, so settings replace, never stack."""
    object_patches, weight_patches = comfy_contract.object_patches(patcher), comfy_contract.weight_patches(patcher)
    for key in [key for key, patch in object_patches.items() if isinstance(patch, QuantizingSetWeight)]:
        del object_patches[key]
    for key in list(weight_patches):
        kept = [patch for patch in weight_patches[key] if not isinstance(patch[1], FP8Marker)]
        if kept:
            weight_patches[key] = kept
        else:
            del weight_patches[key]


def fp8_model_size(patcher, diffusion_model, targets):
    """The model's size once the targets hold FP8 data and one float32 scale per row."""
    saved = 0
    for path in targets:
        weight = comfy_contract.get_attr(diffusion_model, path).weight
        if not is_fp8_weight(weight):
            saved += weight.nbytes - weight.numel() - weight.shape[0] * 4
    return comfy_contract.module_size(patcher.model) - saved


def execution_summary(patcher, targets, kept, activation_scaling):
    if fp8.fp8_matmul_supported(patcher.load_device):
        how = f"FP8 matmuls with {activation_scaling}-wise activation scales"
    else:
        how = (f"weight-only: {patcher.load_device} has no FP8 tensor cores (compute capability 8.9+ needed), "
               "so weights are stored FP8 and multiplied in the model's dtype")
    return f"{NODE_NAME}: {len(targets)} linear layers to FP8 ({how}); {len(kept)} kept: {', '.join(kept)}"


class FP8DynamicQuantize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FluxAccelFP8DynamicQuantize",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "Runs FLUX's transformer linear layers in FP8 e4m3: weights quantized once with one scale per "
                "output channel, activations quantized each call with one scale per token, matmuls on FP8 "
                "tensor cores (RTX 40xx, L4/L40, H100 and newer). Halves the model's VRAM. Input embedders and "
                "the final layer stay in the model's dtype. LoRAs work before or after this node. Without FP8 "
                "tensor cores (CPU, older GPUs) the weights are still stored FP8 and the matmuls run in the "
                "model's dtype. Put Compile FLUX after it for the speed."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX model with bf16, fp16 or fp32 weights (weight_dtype 'default')."),
                io.Combo.Input(
                    "activation_scaling", options=list(ACTIVATION_SCALING_OPTIONS), default="per-row",
                    tooltip=("per-row: one scale per token, the more accurate. per-tensor: one scale per call, "
                             "slightly less accurate.")),
                io.String.Input(
                    "exclude", default="", multiline=False, advanced=True,
                    tooltip=("More layers to keep in the model's dtype: comma-separated names or patterns under the "
                             "diffusion model, e.g. 'single_blocks.37, *.img_mod.lin'. A name covers the layers "
                             "under it.")),
            ],
            outputs=[io.Model.Output(tooltip="The same model; its linear layers run in FP8 while sampling.")],
        )

    @classmethod
    def execute(cls, model, activation_scaling, exclude) -> io.NodeOutput:
        if activation_scaling not in ACTIVATION_SCALING_OPTIONS:
            raise ValueError(f"{NODE_NAME}: activation_scaling must be one of {', '.join(ACTIVATION_SCALING_OPTIONS)}, "
                             f"not '{activation_scaling}'.")
        flux_layout.flux_diffusion_model(model, NODE_NAME)
        # The loader must call `set_weight`, which DynamicVRAM (weights streamed per call) does not.
        patched = non_dynamic_clone(model, NODE_NAME)
        diffusion_model = patched.get_model_object("diffusion_model")
        check_not_quantized_by_comfyui(diffusion_model)
        targets, kept = select_target_layers(diffusion_model, parse_exclusions(exclude))
        check_float_weights(diffusion_model, targets)
        scaling = ACTIVATION_SCALING_OPTIONS[activation_scaling]

        remove_fp8_hooks(patched)
        marker = FP8Marker()
        for path in targets:
            layer_path = f"diffusion_model.{path}"
            patched.add_object_patch(f"{layer_path}.set_weight", QuantizingSetWeight(
                layer_path, comfy_contract.get_attr(patched.model, layer_path), scaling))
        patched.add_patches({f"diffusion_model.{path}.weight": marker for path in targets})
        set_callback(patched, comfy.patcher_extension.CallbacksMP.ON_CLONE, CALLBACK_KEY, retarget_hooks_on_clone)
        comfy_contract.set_loaded_size(patched, fp8_model_size(patched, diffusion_model, targets))
        keep_conds_on_device(patched)
        report_run(execution_summary(patched, targets, kept, scaling))
        return io.NodeOutput(patched)


class FP8QuantizeExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [FP8DynamicQuantize]
