"""FLUX's attention inputs in one pass: queries and keys RMS-normed and rotated (RoPE), values copied.

A FLUX block splits its qkv projection into heads, RMS-norms the queries and keys head by head,
concatenates text and image tokens (double blocks), rotates pairs of elements by each token's 2x2 RoPE
matrices and hands the three to attention. Compiled, inductor wrote that as several kernels whose
RoPE re-read each token's matrices for every head: on an H200 at 1024², 163 us per double block and
83 (plus 13 for transposing attention's output back) per single block; this op's kernel takes 50 us
for the 4608 tokens, reading the projection once and writing q, k and v once.

`qk_norm_rope` does it in one Triton kernel (one program per token) on a GPU, in torch ops elsewhere,
and writes token-major [batch, tokens, heads, head_dim] tensors: their [batch, heads, tokens, head_dim]
views are what attention takes, and cuDNN's attention then writes its output token-major too, so the
transpose back to [batch, tokens, features] is a view instead of a copy.
"""
import typing

import torch

from . import rope
from ..triton_support import triton_kernels_take

QKV_PARTS = 3
# A program per token: FLUX.1-dev's 4608 tokens x 3 x 3072 took 50 us at 2 warps, 51-60 at 1, 4, 8, 16 (H200).
QK_NORM_ROPE_WARPS = 2


@torch.library.custom_op("fluxaccel::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: typing.List[torch.Tensor], query_weights: typing.List[torch.Tensor],
                 key_weights: typing.List[torch.Tensor], eps: typing.Optional[float],
                 freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v), each [batch, tokens, heads, head_dim], of the token segments `qkv` (each [batch, tokens,
    3 * heads * head_dim]: q, k, v as FLUX's `view(b, n, 3, heads, -1)` splits it) concatenated in order:
    q and k as `rms_norm(·, weights[i], eps)` then ComfyUI's interleaved RoPE with `freqs_cis` [batch or 1,
    1, tokens or more, head_dim / 2, 2, 2]. eps None is rms_norm's default for the dtype."""
    if kernel_takes(qkv[0], query_weights[0].shape[-1], freqs_cis):
        return triton_qk_norm_rope(qkv, query_weights, key_weights, eps, freqs_cis)
    return torch_qk_norm_rope(qkv, query_weights, key_weights, eps, freqs_cis)


@qk_norm_rope.register_fake
def _(qkv, query_weights, key_weights, eps, freqs_cis):
    shape = token_major_shape(qkv, query_weights[0].shape[-1])
    return tuple(qkv[0].new_empty(shape) for _ in range(QKV_PARTS))


def kernel_takes(qkv, head_dim, freqs_cis):
    """Whether the Triton kernel runs: a GPU, half-precision activations, float32 RoPE matrices (ComfyUI's) and a
    power-of-two head size (the kernel's block)."""
    return (triton_kernels_take(qkv) and qkv.dtype in (torch.bfloat16, torch.float16)
            and freqs_cis.dtype == torch.float32 and head_dim & (head_dim - 1) == 0)


def token_major_shape(qkv, head_dim):
    """[batch, tokens of every segment, heads, head_dim]."""
    return (qkv[0].shape[0], sum(segment.shape[1] for segment in qkv), qkv[0].shape[-1] // (QKV_PARTS * head_dim),
            head_dim)


def torch_qk_norm_rope(qkv, query_weights, key_weights, eps, freqs_cis):
    """The op as FLUX's own torch code computes it (`kernels.rope` is ComfyUI's RoPE as torch ops)."""
    head_dim = query_weights[0].shape[-1]
    heads_of = [segment.unflatten(-1, (QKV_PARTS, -1, head_dim)) for segment in qkv]
    queries = torch.cat([torch.rms_norm(h[:, :, 0], (head_dim,), w, eps) for h, w in zip(heads_of, query_weights)], 1)
    keys = torch.cat([torch.rms_norm(h[:, :, 1], (head_dim,), w, eps) for h, w in zip(heads_of, key_weights)], 1)
    values = torch.cat([h[:, :, 2] for h in heads_of], 1)
    rotated = [rope.interleaved_rope(t.transpose(1, 2).to(values.dtype), freqs_cis).transpose(1, 2)
               for t in (queries, keys)]
    return tuple(t.contiguous() for t in (*rotated, values))


def triton_qk_norm_rope(qkv, query_weights, key_weights, eps, freqs_cis):
    from . import qk_norm_rope_triton

    head_dim = query_weights[0].shape[-1]
    shape = token_major_shape(qkv, head_dim)
    if 1 < freqs_cis.shape[2] < shape[1]:
        raise ValueError(f"RoPE matrices for {freqs_cis.shape[2]} positions, attention over {shape[1]} tokens")
    outputs = tuple(torch.empty(shape, dtype=qkv[0].dtype, device=qkv[0].device) for _ in range(QKV_PARTS))
    freqs = freqs_cis.flatten(-3)
    if freqs.stride(-1) != 1:
        freqs = freqs.contiguous()
    # rms_norm's default: the machine epsilon of the float32 it computes in.
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    block_heads = 1 << (shape[2] - 1).bit_length()  # the heads, padded to a power of two (masked)
    first_token = 0
    for segment, query_weight, key_weight in zip(qkv, query_weights, key_weights):
        segment = segment if segment.stride(-1) == 1 else segment.contiguous()
        if segment.shape[0] * segment.shape[1] > 0:
            qk_norm_rope_triton.qk_norm_rope_row[(segment.shape[0] * segment.shape[1],)](
                segment, segment.stride(0), segment.stride(1), segment.shape[1], first_token, shape[1],
                query_weight.contiguous(), key_weight.contiguous(), freqs, broadcast_stride(freqs, 0),
                broadcast_stride(freqs, 2), eps, *outputs, HEADS=shape[2], HEAD_DIM=head_dim,
                BLOCK_HEADS=block_heads, num_warps=QK_NORM_ROPE_WARPS)
        first_token += segment.shape[1]
    return outputs


def broadcast_stride(tensor, dim):
    """The stride along `dim`, 0 where the dimension has size 1 and broadcasts."""
    return tensor.stride(dim) if tensor.shape[dim] > 1 else 0
