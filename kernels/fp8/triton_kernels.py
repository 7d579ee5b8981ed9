"""Triton kernels of `kernels.fp8`'s custom ops, in a module of their own: `kernels.fp8` imports it only
where a kernel runs, and a Triton kernel calls only helpers defined at its module's top level."""
import triton
import triton.language as tl

# |GELU(x)| stays below this for x <= 0 (tanh GELU's minimum is -0.16997 at x = -0.7518), and GELU rises
# for every x above -0.7518.
GELU_NEGATIVE_BOUND = tl.constexpr(0.171)


@triton.jit
def saturate_to_fp8(scaled, FP8_MAX: tl.constexpr):
    return tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX).to(tl.float8e4nv)


@triton.jit
def quantize_row(x_ptr, qdata_ptr, scale_ptr, features, x_row_stride, FP8_MAX: tl.constexpr,
                 INVERSE_FP8_MAX: tl.constexpr, SCALE_FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row, the whole row held in registers: read once, written once."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < features
    values = tl.load(x_ptr + row * x_row_stride + columns, mask=inside, other=0.0)
    amax = tl.max(tl.abs(values), axis=0).to(tl.float32)
    scale = tl.maximum(amax * INVERSE_FP8_MAX, SCALE_FLOOR)
    # Correctly rounded, as torch divides by a tensor: the same quotients give the same bytes.
    scaled = tl.math.div_rn(values.to(tl.float32), scale)
    tl.store(qdata_ptr + row * features + columns, saturate_to_fp8(scaled, FP8_MAX), mask=inside)
    tl.store(scale_ptr + row, scale)


@triton.jit
def approximate_reciprocal(x):
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def gelu_tanh(x, PTX: tl.constexpr):
    # 0.5 x (1 + tanh(u)) = x / (1 + 2^(-2u log2(e))), u = sqrt(2/pi) (x + 0.044715 x^3), as Triton's interpreter
    # has no tanh; 2.3022... = 2 sqrt(2/pi) log2(e). One exp2 and one division: on FLUX's shapes on an H200 the
    # kernel ran 6-12 % faster than with x * sigmoid(2u), with the same FP8 bytes. With PTX (an NVIDIA GPU, not the
    # interpreter) the division is a multiplication by rcp.approx's reciprocal (one instruction, within an ulp):
    # 4-6 % faster again, the same FP8 bytes on the probe's 4608 x 15360, 4096 x 12288 and 512 x 12288 rows.
    # Quantized from float32: the GELU module's rounding to bf16 is skipped, one rounding less.
    x = x.to(tl.float32)
    denominator = 1.0 + tl.math.exp2(-2.302208198144325 * (x + 0.044715 * x * x * x))
    if PTX:
        return x * approximate_reciprocal(denominator)
    else:
        return x / denominator


@triton.jit
def quantize_gelu_row(prefix_ptr, prefix_features, prefix_row_stride, gelu_ptr, gelu_features, gelu_row_stride,
                      qdata_ptr, scale_ptr, FP8_MAX: tl.constexpr, INVERSE_FP8_MAX: tl.constexpr,
                      SCALE_FLOOR: tl.constexpr, BLOCK: tl.constexpr, PTX: tl.constexpr):
    """One program per row of cat([prefix, gelu(pre-activation)]), read a chunk at a time: once for the
    absmax, once to quantize. (A whole 15360-wide row per program, as `quantize_row`, took 223 us on an
    H200 against 185 for writing the GELU out and quantizing that; this kernel takes 76.)

    On an H200 the kernel is bound by arithmetic as much as by memory, hence: the GELU part's absmax from
    its largest input alone where that decides it, and a multiplication by the scale's reciprocal instead
    of a correctly rounded division (bytes differ from the division's at one value in 10^6)."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    prefix_row = prefix_ptr + row * prefix_row_stride
    gelu_row = gelu_ptr + row * gelu_row_stride
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, prefix_features, BLOCK):
        inside = start + columns < prefix_features
        amax = tl.maximum(amax, tl.abs(tl.load(prefix_row + start + columns, mask=inside, other=0.0).to(tl.float32)))
    largest = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in range(0, gelu_features, BLOCK):
        inside = start + columns < gelu_features
        largest = tl.maximum(largest, tl.load(gelu_row + start + columns, mask=inside, other=float("-inf")).to(tl.float32))
    top = gelu_tanh(tl.max(largest, axis=0), PTX)
    if top >= GELU_NEGATIVE_BOUND:
        amax = tl.maximum(amax, top)
    else:  # a row of small inputs (or a NaN): every GELU counts
        for start in range(0, gelu_features, BLOCK):
            inside = start + columns < gelu_features
            amax = tl.maximum(amax, tl.abs(gelu_tanh(tl.load(gelu_row + start + columns, mask=inside, other=0.0), PTX)))
    scale = tl.maximum(tl.max(amax, axis=0) * INVERSE_FP8_MAX, SCALE_FLOOR)
    inverse = tl.math.div_rn(1.0, scale)
    qdata_row = qdata_ptr + row * (prefix_features + gelu_features)
    for start in range(0, prefix_features, BLOCK):
        inside = start + columns < prefix_features
        values = tl.load(prefix_row + start + columns, mask=inside, other=0.0).to(tl.float32)
        tl.store(qdata_row + start + columns, saturate_to_fp8(values * inverse, FP8_MAX), mask=inside)
    for start in range(0, gelu_features, BLOCK):
        inside = start + columns < gelu_features
        values = gelu_tanh(tl.load(gelu_row + start + columns, mask=inside, other=0.0), PTX)
        tl.store(qdata_row + prefix_features + start + columns, saturate_to_fp8(values * inverse, FP8_MAX), mask=inside)
    tl.store(scale_ptr + row, scale)


@triton.jit
def one_row_matmul(x_ptr, weight_ptr, scale_ptr, bias_ptr, out_ptr, out_features, in_features,
                   HAS_BIAS: tl.constexpr, BLOCK_OUTPUTS: tl.constexpr, BLOCK_INPUTS: tl.constexpr):
    """One program per BLOCK_OUTPUTS outputs: their weight rows read once, BLOCK_INPUTS at a time, the products
    summed element-wise and reduced across the chunk once at the end; row scales and bias applied last."""
    outputs = tl.program_id(0) * BLOCK_OUTPUTS + tl.arange(0, BLOCK_OUTPUTS)
    inputs = tl.arange(0, BLOCK_INPUTS)
    inside = outputs < out_features
    weight_rows = weight_ptr + outputs.to(tl.int64)[:, None] * in_features
    products = tl.zeros([BLOCK_OUTPUTS, BLOCK_INPUTS], dtype=tl.float32)
    for start in range(0, in_features, BLOCK_INPUTS):
        columns = start + inputs
        weight = tl.load(weight_rows + columns[None, :], mask=inside[:, None] & (columns[None, :] < in_features),
                         other=0.0)
        x = tl.load(x_ptr + columns, mask=columns < in_features, other=0.0)
        products += weight.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(products, axis=1) * tl.load(scale_ptr + outputs, mask=inside, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + outputs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + outputs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def quantize_modulated_layer_norm_row(x_ptr, mult_ptr, shift_ptr, qdata_ptr, scale_ptr, features, tokens,
                                      mult_batch_stride, shift_batch_stride, eps, FP8_MAX: tl.constexpr,
                                      INVERSE_FP8_MAX: tl.constexpr, SCALE_FLOOR: tl.constexpr, BLOCK: tl.constexpr,
                                      ONE_PLUS_MULT: tl.constexpr):
    """One program per row, the row held in registers: the layer norm (no affine weights) rounded to the input's
    dtype, then shift + normalized * mult (the row's batch entry of each; with ONE_PLUS_MULT, 1 + mult rounded to
    the input's dtype) rounded again, as the model computes them; then the FP8 row, multiplied by the scale's
    reciprocal (a division cost twice the kernel's time on an H200), and its scale."""
    row = tl.program_id(0).to(tl.int64)
    batch = row // tokens
    columns = tl.arange(0, BLOCK)
    inside = columns < features
    x = tl.load(x_ptr + row * features + columns, mask=inside, other=0.0)
    mean = tl.sum(x.to(tl.float32), axis=0) / features
    centered = tl.where(inside, x.to(tl.float32) - mean, 0.0)
    inverse_std = tl.math.rsqrt(tl.sum(centered * centered, axis=0) / features + eps)
    normalized = (centered * inverse_std).to(x.dtype).to(tl.float32)
    mult = tl.load(mult_ptr + batch * mult_batch_stride + columns, mask=inside, other=0.0)
    if ONE_PLUS_MULT:
        mult = (1.0 + mult.to(tl.float32)).to(x.dtype)
    mult = mult.to(tl.float32)
    shift = tl.load(shift_ptr + batch * shift_batch_stride + columns, mask=inside, other=0.0).to(tl.float32)
    modulated = (shift + normalized * mult).to(x.dtype).to(tl.float32)
    amax = tl.max(tl.abs(modulated), axis=0)
    scale = tl.maximum(amax * INVERSE_FP8_MAX, SCALE_FLOOR)
    inverse = tl.math.div_rn(1.0, scale)
    tl.store(qdata_ptr + row * features + columns, saturate_to_fp8(modulated * inverse, FP8_MAX), mask=inside)
    tl.store(scale_ptr + row, scale)
