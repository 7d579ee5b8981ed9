"""FLUX Attention Backend: FLUX's attention on the fastest of PyTorch's fused attention kernels.

Hook-up: `transformer_options["optimized_attention_override"]` on the node's clone, ComfyUI's
extension point for attention. Every attention call of the model reaches the override, which runs
PyTorch's scaled_dot_product_attention with the chosen backend order. Context Parallel keeps it as
the attention each rank runs on its heads, on every GPU.
"""
import logging

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from ..kernels.attention.backends import BACKEND_ORDERS, auto_backend, heads_first_attention
from . import CATEGORY, comfy_contract, flux_layout
from .patcher_hooks import keep_conds_on_device

NODE_NAME = comfy_contract.ATTENTION
OVERRIDE_KEY = "optimized_attention_override"
BACKEND_CHOICES = ["auto", *BACKEND_ORDERS]


class AttentionOnBackend:
    """An `optimized_attention_override`: ComfyUI's attention call, on `backend`'s order of SDPA kernels."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, attention, query, key, value, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, scale=None, enable_gqa=False, **kwargs):
        # attn_precision: ComfyUI's own SDPA path ignores it too (SDPA accumulates in float32).
        if not skip_reshape:
            head_dim = query.shape[-1] // heads
            query, key, value = (tokens_to_heads(t, head_dim) for t in (query, key, value))
        out = heads_first_attention(query, key, value, self.backend, mask=heads_first_mask(mask), scale=scale,
                                    enable_gqa=enable_gqa)
        return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def tokens_to_heads(tensor, head_dim):
    """[batch, tokens, heads * head_dim] → [batch, heads, tokens, head_dim] (keys and values may have
    fewer heads than queries: grouped-query attention)."""
    return tensor.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def heads_first_mask(mask):
    """A ComfyUI attention mask ([tokens, tokens], [batch, …] or [batch, heads, …]) with SDPA's four dimensions."""
    if mask is None:
        return None
    while mask.ndim < 4:
        mask = mask.unsqueeze(0 if mask.ndim == 2 else 1)
    return mask


def attention_backend(model_options):
    """The backend the node put on a model, or None."""
    attention = model_options["transformer_options"].get(OVERRIDE_KEY)
    return attention.backend if isinstance(attention, AttentionOnBackend) else None


class FluxAttentionBackend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FluxAccelAttention",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "Runs FLUX's attention on the fastest of PyTorch's attention kernels for the GPU. ComfyUI tries "
                "flash attention first everywhere; on Hopper GPUs (H100, H200) cuDNN's attention is twice as fast "
                "at FLUX's sizes, a fifth of each step at FP8. Same attention, another kernel: images change only "
                "by rounding."),
            inputs=[
                io.Model.Input("model", tooltip=flux_layout.MODEL_INPUT_TOOLTIP),
                io.Combo.Input(
                    "backend", options=BACKEND_CHOICES, default="auto",
                    tooltip=("auto: cuDNN first on Hopper GPUs, ComfyUI's order (flash first) elsewhere. cudnn, flash, "
                             "efficient: that kernel first; a call it cannot take goes to the next one.")),
            ],
            outputs=[io.Model.Output(tooltip="The same model; its attention runs on the chosen kernels.")],
        )

    @classmethod
    def execute(cls, model, backend) -> io.NodeOutput:
        flux_layout.flux_diffusion_model(model, NODE_NAME)
        chosen = auto_backend(model.load_device) if backend == "auto" else backend
        patched = model.clone()
        options = patched.model_options["transformer_options"]
        if options.get(OVERRIDE_KEY) is not None and attention_backend(patched.model_options) is None:
            logging.warning("%s replaces the attention override another node set on this model.", NODE_NAME)
        options[OVERRIDE_KEY] = AttentionOnBackend(chosen)
        keep_conds_on_device(patched)
        logging.info("%s: %s attention first on %s.", NODE_NAME, chosen, model.load_device)
        return io.NodeOutput(patched)


class AttentionExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [FluxAttentionBackend]
