"""Triton kernel of `kernels.qk_norm_rope`'s custom op, in a module of its own: imported only where it runs."""
import triton
import triton.language as tl


@triton.jit
def qk_norm_rope_row(qkv_ptr, qkv_batch_stride, qkv_token_stride, tokens, first_token, total_tokens,
                     query_weight_ptr, key_weight_ptr, freqs_ptr, freqs_batch_stride, freqs_token_stride, eps,
                     query_ptr, key_ptr, value_ptr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_HEADS: tl.constexpr):
    """One program per token: its query and key (every head) RMS-normed and rotated, its value copied, all three
    written token-major. The token's rotation matrices are read once for all heads and both tensors."""
    program = tl.program_id(0)
    batch = (program // tokens).to(tl.int64)
    token = (program % tokens).to(tl.int64)
    source = qkv_ptr + batch * qkv_batch_stride + token * qkv_token_stride
    width: tl.constexpr = HEADS * HEAD_DIM
    destination = (batch * total_tokens + first_token + token) * width
    offsets = tl.arange(0, BLOCK_HEADS)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    inside = offsets < width
    # The token's 2x2 matrices, [HEAD_DIM / 2, 2 (output element), 2 (input element)].
    freqs = tl.load(freqs_ptr + batch * freqs_batch_stride + (first_token + token) * freqs_token_stride
                    + tl.arange(0, 2 * HEAD_DIM))
    from_even, from_odd = tl.split(tl.reshape(freqs, (HEAD_DIM // 2, 2, 2)))
    for part in tl.static_range(2):
        weight_ptr = query_weight_ptr if part == 0 else key_weight_ptr
        output_ptr = query_ptr if part == 0 else key_ptr
        rows = tl.load(source + part * width + offsets, mask=inside, other=0.0)
        rotated = normed_rotated(rows, tl.load(weight_ptr + tl.arange(0, HEAD_DIM)), from_even, from_odd, eps,
                                 BLOCK_HEADS, HEAD_DIM)
        tl.store(output_ptr + destination + offsets, rotated.to(rows.dtype), mask=inside)
    tl.store(value_ptr + destination + offsets, tl.load(source + 2 * width + offsets, mask=inside), mask=inside)


@triton.jit
def normed_rotated(rows, weight, from_even, from_odd, eps, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """rms_norm(rows) * weight, rounded to the rows' dtype as torch's rms_norm returns it, then each pair
    (2k, 2k+1) multiplied by its 2x2 matrix in float32: ComfyUI's RMSNorm, then its RoPE."""
    values = rows.to(tl.float32)
    mean_square = tl.sum(values * values, axis=1) / HEAD_DIM
    normed = values * tl.math.rsqrt(mean_square + eps)[:, None] * weight.to(tl.float32)[None, :]
    normed = normed.to(rows.dtype).to(tl.float32)
    even, odd = tl.split(tl.reshape(normed, (BLOCK_HEADS, HEAD_DIM // 2, 2)))
    rotated = from_even[None, :, :] * even[:, :, None] + from_odd[None, :, :] * odd[:, :, None]
    return tl.reshape(rotated, (BLOCK_HEADS, HEAD_DIM))
