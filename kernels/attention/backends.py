"""Scaled-dot-product attention on PyTorch's fused backends, tried in an order chosen per GPU.

ComfyUI puts flash attention (FlashAttention-2) first on every NVIDIA GPU. On Hopper, cuDNN's
fused attention runs FLUX.1-dev's attention at 1024² (24 heads × 4608 tokens × 128) in 0.40 ms
against flash's 0.79 ms (H100, torch 2.11, cuDNN 9.19): a fifth of a FLUX.1-dev step's GPU time at
FP8. An order is a priority list: a backend that cannot take a call (its dtype, mask or head size)
passes it to the next one, so every order gives the same attention.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKEND_ORDERS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    # ComfyUI's own order.
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH],
}
# Where cuDNN's attention was measured faster than flash's; elsewhere "auto" keeps ComfyUI's order.
CUDNN_FIRST_CAPABILITIES = ((9, 0),)


def auto_backend(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in CUDNN_FIRST_CAPABILITIES:
        return "cudnn"
    return "flash"


def heads_first_attention(query, key, value, backend, mask=None, scale=None, enable_gqa=False):
    """softmax(q kᵀ · scale + mask) v for [batch, heads, tokens, head_dim] tensors, on `backend`'s order."""
    with sdpa_kernel(BACKEND_ORDERS[backend], set_priority=True):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                                enable_gqa=enable_gqa)
