"""FP8 e4m3 linear layers with dynamic scales: weights per output row, activations per token row.

Weights are quantized once, with one scale per output row (absmax / 448) and round-to-nearest, so
the same weight always gives the same bytes. Activations are quantized at run time, with one scale
per row (default) or one for the whole tensor, and `torch._scaled_mm` multiplies them on FP8 tensor
cores. Without FP8 tensor cores (CPU, GPUs before compute capability 8.9) the weight is dequantized
and the matmul runs in the activation's dtype ("weight-only"): the FP8 weights still halve memory.

Row-wise activation quantization is plain torch ops, which inductor fuses into the ops producing the
activation. That serves rows of FLUX's width (3072) well; for the MLPs' wide inputs (12288, and 15360
= attention + MLP in the single blocks) it generated a reduction and a second pass over each row: on
an H200, 173 and 304 us per call (4096 x 12288 and 4608 x 15360), 14 % of a step. Wide rows on a GPU
take `quantize_wide_rows` instead, a Triton kernel that holds a row in registers, reads it once and
gives the same bytes. Inductor then writes the row's input (the GELU, the concatenation) out first;
under Compile FLUX a graph pass (`kernels.fp8.graph_pass`) hands those inputs to `quantize_gelu_rows`,
which computes the GELU itself from the previous layer's output.
"""
import fnmatch
import functools
import typing

import torch

from ..triton_support import compiles_to_ptx, triton_kernels_take

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# Scales are absmax times this float32 constant, not absmax / 448: torch's GPU kernels turn a division by
# a number into that multiplication anyway, so eager torch on any device, inductor's kernels and the
# Triton kernel below all compute the same scale.
INVERSE_FP8_MAX = 1.0 / FP8_MAX
ACTIVATION_SCALINGS = ("row", "tensor")
MIN_FP8_MATMUL_CAPABILITY = (8, 9)
# The smallest scale: all-zero rows quantize to zeros instead of NaN. A normal float32 (subnormals
# may be flushed to zero by GPU kernels), far below any real row's absmax / 448.
SCALE_FLOOR = torch.finfo(torch.float32).tiny
# torch._scaled_mm takes FP8 operands whose inner and outer dimensions are multiples of 16.
SCALED_MM_ALIGNMENT = 16
# Rows 8192 to 16384 wide take the one-pass Triton kernel on a GPU (one program holds one row: up to
# 32 float32 values per thread at 16 warps); narrower rows stay with inductor's fused quantization.
WIDE_ROW_FEATURES = (8192, 16384)
WIDE_ROW_WARPS = 16
# `quantize_gelu_rows` reads a row this many elements at a time, a program of 4 warps per row: the fastest
# of 512-2048 elements x 2-16 warps on an H200 (4608 x 15360: 86 us, 100 at 1024 elements).
GELU_ROW_BLOCK = 2048
GELU_ROW_WARPS = 4
# Layers run on one row (FLUX's modulations: one row per image, from the timestep and the pooled text) take
# `one_row_linear`: reading the weight is all their time. On an H200 the kernel reads 18432 x 3072 in 19 us and
# 9216 x 3072 in 12.4 us (the fastest of 7 block shapes tried), where the row's quantization and _scaled_mm took
# 21.5 us per call on average in the model.
ONE_ROW_BLOCK_OUTPUTS = 8
ONE_ROW_BLOCK_INPUTS = 512
ONE_ROW_WARPS = 2
# FLUX's block inputs (layer norm, modulation, FP8 rows) in `quantize_modulated_layer_norm`: a row of up to this
# many features per 4-warp program. On an H200, 18.3 us for 4608 x 3072 against 29.0 for inductor's fused kernel
# (8 warps took 21.6, 16 took 27.5).
MODULATED_LAYER_NORM_MAX_FEATURES = 4096
MODULATED_LAYER_NORM_WARPS = 4
# Weights are quantized this many elements at a time, so that the float32 temporaries of FLUX's
# largest layer (66 M elements) stay at 64 MiB each instead of adding 1 GiB to the load's peak VRAM.
QUANTIZE_CHUNK_ELEMENTS = 2**24


def quantize_rows(tensor):
    """(FP8 data, float32 scales of shape [rows, 1]): one scale per row, round to nearest."""
    return quantize_by_absmax(tensor, tensor.abs().amax(dim=-1, keepdim=True))


def quantize_by_absmax(tensor, amax):
    """(FP8 data, float32 scale): `tensor` scaled so that `amax` (broadcast over it) maps to 448."""
    scale = (amax.float() * INVERSE_FP8_MAX).clamp(min=SCALE_FLOOR)
    qdata = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return qdata, scale


@torch.library.custom_op("fluxaccel::quantize_wide_rows", mutates_args=())
def quantize_wide_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(rows)` of a 2-D tensor in one Triton kernel (a custom op: compiled graphs call it)."""
    import triton

    from . import triton_kernels

    rows = contiguous_rows(rows)
    qdata = torch.empty(rows.shape, dtype=FP8_DTYPE, device=rows.device)
    scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=rows.device)
    if rows.shape[0] > 0:
        triton_kernels.quantize_row[(rows.shape[0],)](
            rows, qdata, scale, rows.shape[1], rows.stride(0), FP8_MAX=FP8_MAX, INVERSE_FP8_MAX=INVERSE_FP8_MAX,
            SCALE_FLOOR=SCALE_FLOOR, BLOCK=triton.next_power_of_2(rows.shape[1]), num_warps=WIDE_ROW_WARPS)
    return qdata, scale


@quantize_wide_rows.register_fake
def _(rows):
    return rows.new_empty(rows.shape, dtype=FP8_DTYPE), rows.new_empty((rows.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("fluxaccel::quantize_gelu_rows", mutates_args=())
def quantize_gelu_rows(prefix: typing.Optional[torch.Tensor],
                       pre_activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(cat([prefix, gelu_tanh(pre_activation)], -1))` of 2-D tensors, without writing the
    GELU or the concatenation out: the MLP's second linear layer's input (`prefix`: the single blocks'
    attention output, or None). The GELU is quantized from float32, not first rounded to the input's dtype."""
    from . import triton_kernels

    pre_activation = contiguous_rows(pre_activation)
    prefix = pre_activation[:, :0] if prefix is None else contiguous_rows(prefix)
    features = prefix.shape[1] + pre_activation.shape[1]
    qdata = torch.empty((pre_activation.shape[0], features), dtype=FP8_DTYPE, device=pre_activation.device)
    scale = torch.empty((pre_activation.shape[0], 1), dtype=torch.float32, device=pre_activation.device)
    if pre_activation.shape[0] > 0:
        triton_kernels.quantize_gelu_row[(pre_activation.shape[0],)](
            prefix, prefix.shape[1], prefix.stride(0), pre_activation, pre_activation.shape[1],
            pre_activation.stride(0), qdata, scale, FP8_MAX=FP8_MAX, INVERSE_FP8_MAX=INVERSE_FP8_MAX,
            SCALE_FLOOR=SCALE_FLOOR, BLOCK=GELU_ROW_BLOCK, PTX=compiles_to_ptx(pre_activation),
            num_warps=GELU_ROW_WARPS)
    return qdata, scale


@quantize_gelu_rows.register_fake
def _(prefix, pre_activation):
    features = pre_activation.shape[1] + (0 if prefix is None else prefix.shape[1])
    return (pre_activation.new_empty((pre_activation.shape[0], features), dtype=FP8_DTYPE),
            pre_activation.new_empty((pre_activation.shape[0], 1), dtype=torch.float32))


@torch.library.custom_op("fluxaccel::quantize_modulated_layer_norm", mutates_args=())
def quantize_modulated_layer_norm(x: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, eps: float,
                                  one_plus_mult: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(addcmul(shift, layer_norm(x, eps=eps), mult).reshape(-1, features))` for x [batch, tokens,
    features], mult and shift [batch or 1, 1, features], the layer norm without affine weights: FLUX's block inputs
    (`kernels.fp8.graph_pass` hands them over), in one Triton kernel that reads each row once. With
    `one_plus_mult`, the rows are modulated by 1 + mult computed in x's dtype, as FLUX's blocks compute it: the
    kernel adds the 1 instead of a kernel of its own writing the sum out."""
    import triton

    from . import triton_kernels

    batch, tokens, features = x.shape
    x = x.contiguous()
    mult, shift = (contiguous_rows(modulation.expand(batch, 1, features)) for modulation in (mult, shift))
    qdata = torch.empty((batch * tokens, features), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((batch * tokens, 1), dtype=torch.float32, device=x.device)
    if qdata.shape[0] > 0:
        triton_kernels.quantize_modulated_layer_norm_row[(qdata.shape[0],)](
            x, mult, shift, qdata, scale, features, tokens, mult.stride(0), shift.stride(0), eps, FP8_MAX=FP8_MAX,
            INVERSE_FP8_MAX=INVERSE_FP8_MAX, SCALE_FLOOR=SCALE_FLOOR, BLOCK=triton.next_power_of_2(features),
            ONE_PLUS_MULT=one_plus_mult, num_warps=MODULATED_LAYER_NORM_WARPS)
    return qdata, scale


@quantize_modulated_layer_norm.register_fake
def _(x, mult, shift, eps, one_plus_mult=False):
    rows = x.shape[0] * x.shape[1]
    return x.new_empty((rows, x.shape[2]), dtype=FP8_DTYPE), x.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("fluxaccel::one_row_linear", mutates_args=())
def one_row_linear(row: torch.Tensor, weight_qdata: torch.Tensor, weight_scale: torch.Tensor,
                   bias: typing.Optional[torch.Tensor]) -> torch.Tensor:
    """`row @ W.T + bias` in the row's dtype for W = weight_qdata * weight_scale (per output row) and a row
    [1, in], in one Triton kernel that reads the FP8 weight once. Weight-only: the row is not quantized."""
    import triton

    from . import triton_kernels

    row, weight_qdata = contiguous_rows(row), contiguous_rows(weight_qdata)
    out_features, in_features = weight_qdata.shape
    out = torch.empty((1, out_features), dtype=row.dtype, device=row.device)
    triton_kernels.one_row_matmul[(triton.cdiv(out_features, ONE_ROW_BLOCK_OUTPUTS),)](
        row, weight_qdata, weight_scale.reshape(-1), bias, out, out_features, in_features, HAS_BIAS=bias is not None,
        BLOCK_OUTPUTS=ONE_ROW_BLOCK_OUTPUTS, BLOCK_INPUTS=ONE_ROW_BLOCK_INPUTS, num_warps=ONE_ROW_WARPS)
    return out


@one_row_linear.register_fake
def _(row, weight_qdata, weight_scale, bias):
    return row.new_empty((1, weight_qdata.shape[0]))


def contiguous_rows(rows):
    """`rows` if its elements are contiguous within each row (a column slice is), else a contiguous copy."""
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def quantize_activation(rows, activation_scaling):
    """(FP8 data, float32 scales) of activation rows [n, features], as `activation_scaling` says."""
    if activation_scaling != "row":
        return quantize_whole(rows)
    wide = WIDE_ROW_FEATURES[0] <= rows.shape[-1] <= WIDE_ROW_FEATURES[1]
    if wide and triton_kernels_take(rows):
        return quantize_wide_rows(rows)
    return quantize_rows(rows)


def quantize_weight_rows(weight, dtype):
    """`quantize_rows(weight.to(dtype))`, a block of rows at a time."""
    qdata = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scale = torch.empty((weight.shape[0], 1), dtype=torch.float32, device=weight.device)
    rows_per_chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // weight.shape[-1])
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        qdata[rows], scale[rows] = quantize_rows(weight[rows].to(dtype))
    return qdata, scale


def quantize_whole(tensor):
    """(FP8 data, float32 scale of shape [1, 1]): one scale for the whole tensor."""
    return quantize_by_absmax(tensor, tensor.abs().amax().reshape(1, 1))


def dequantize_rows(qdata, scale, dtype):
    return (qdata.float() * scale).to(dtype)


@functools.lru_cache(maxsize=None)
def fp8_matmul_supported(device):
    """Whether `device` has FP8 tensor cores that torch._scaled_mm can use."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= MIN_FP8_MATMUL_CAPABILITY


def scaled_mm_shape_supported(in_features, out_features):
    return in_features % SCALED_MM_ALIGNMENT == 0 and out_features % SCALED_MM_ALIGNMENT == 0


def fp8_linear(x, weight_qdata, weight_scale, bias=None, activation_scaling="row"):
    """`x @ W.T + bias` for W = weight_qdata * weight_scale (per output row), in x's dtype.

    On FP8 tensor cores the activation is quantized too (W8A8); elsewhere it is weight-only.
    """
    out_features, in_features = weight_qdata.shape
    if fp8_matmul_supported(x.device) and scaled_mm_shape_supported(in_features, out_features):
        return scaled_mm_linear(x, weight_qdata, weight_scale, bias, activation_scaling)
    return torch.nn.functional.linear(x, dequantize_rows(weight_qdata, weight_scale, x.dtype), bias)


def scaled_mm_linear(x, weight_qdata, weight_scale, bias, activation_scaling):
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1 and triton_kernels_take(rows):
        return one_row_linear(rows, weight_qdata, weight_scale, bias).reshape(*x.shape[:-1], weight_qdata.shape[0])
    x_qdata, x_scale = quantize_activation(rows, activation_scaling)
    # Row-wise _scaled_mm takes one scale per row of each operand, and writes bf16. Fast accumulation
    # (Hopper's FP8 MMA without cuBLAS's periodic promotion to float32) makes FLUX.1-dev's layers
    # 8-24 % faster on an H100 for 0.2-0.4 % relative change, a tenth of FP8's own rounding error.
    out = torch._scaled_mm(x_qdata, weight_qdata.t(), scale_a=x_scale.expand(rows.shape[0], 1).contiguous(),
                           scale_b=weight_scale.t(), bias=None if bias is None else bias.to(torch.bfloat16),
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight_qdata.shape[0])


def matches_any(name, patterns):
    """Whether a module path matches one of the fnmatch patterns, a pattern also naming what is under it."""
    return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*") for pattern in patterns)


def linear_layer_names(module):
    """The dotted paths of every torch.nn.Linear under `module`."""
    return [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)]


def select_layers(layer_names, excluded_patterns):
    """(layers to quantize, layers kept), in the order given."""
    kept = [name for name in layer_names if matches_any(name, excluded_patterns)]
    kept_names = set(kept)
    return [name for name in layer_names if name not in kept_names], kept
