"""kernels.qk_norm_rope (FLUX's attention inputs in one pass) against FLUX's own torch code, its Triton kernel
against the torch ops, and the rewrite of Dynamo graphs that hands it the attention inputs."""
import pytest
import torch

from fluxaccel.kernels.attention import qk_norm_rope, qk_norm_rope_graph_pass, rope
from tests.support.triton_interpreter import (KERNEL_DEVICE, assert_passes_in_tritons_interpreter, needs_kernel_device,
                                              runs_kernel_tests_in_a_child)

comfy_kitchen = pytest.importorskip("comfy_kitchen", reason="ComfyUI's RoPE op comes from comfy_kitchen")

HEAD_DIM = 16


def rope_matrices(positions, batch=1, seed=0):
    """FLUX-shaped RoPE matrices [batch, 1, positions, HEAD_DIM / 2, 2, 2] of random angles, float32."""
    angles = torch.rand(batch, 1, positions, HEAD_DIM // 2, generator=torch.Generator().manual_seed(seed)) * 6.3
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], -1).reshape(batch, 1, positions, HEAD_DIM // 2, 2, 2)


def segments(dtype, heads=3, batch=2, tokens=(5, 9), device="cpu", seed=1):
    """Token segments of qkv projections; the first a column slice of a wider tensor (FLUX's single blocks
    split qkv off their first layer's output), with norm weights around 1."""
    generator = torch.Generator().manual_seed(seed)
    width = 3 * heads * HEAD_DIM
    qkv = [torch.randn(batch, tokens[0], width + 40, generator=generator)[..., :width]]
    qkv += [torch.randn(batch, count, width, generator=generator) * 3 for count in tokens[1:]]
    weights = [1 + 0.2 * torch.randn(2, HEAD_DIM, generator=generator) for _ in tokens]
    return ([t.to(dtype).to(device) for t in qkv], [w[0].to(dtype).to(device) for w in weights],
            [w[1].to(dtype).to(device) for w in weights])


def flux_heads(qkv, heads):
    """Each segment's (q, k, v), split into heads as FLUX's blocks do."""
    return [t.view(t.shape[0], t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4) for t in qkv]


def flux_normed_heads(qkv, query_weights, key_weights, heads, eps=None):
    """FLUX's blocks as ComfyUI writes them: split heads, RMS-norm, concatenate the segments."""
    parts = flux_heads(qkv, heads)
    queries = torch.cat([torch.rms_norm(q, (HEAD_DIM,), w, eps).to(v) for (q, _, v), w in zip(parts, query_weights)], 2)
    keys = torch.cat([torch.rms_norm(k, (HEAD_DIM,), w, eps).to(v) for (_, k, v), w in zip(parts, key_weights)], 2)
    return queries, keys, torch.cat([v for _, _, v in parts], 2)


def flux_attention_inputs(qkv, query_weights, key_weights, freqs_cis, heads, eps=None):
    """... then ComfyUI's RoPE op."""
    queries, keys, values = flux_normed_heads(qkv, query_weights, key_weights, heads, eps)
    return (*torch.ops.comfy_kitchen.apply_rope(queries, keys, freqs_cis), values)


def heads_first(token_major):
    return tuple(t.transpose(1, 2) for t in token_major)


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_torch_path_is_fluxs_own_computation(eps):
    """More RoPE positions than tokens: the first ones apply, as in ComfyUI."""
    qkv, query_weights, key_weights = segments(torch.float32)
    freqs_cis = rope_matrices(20)
    expected = flux_attention_inputs(qkv, query_weights, key_weights, freqs_cis, heads=3, eps=eps)
    actual = qk_norm_rope.qk_norm_rope(qkv, query_weights, key_weights, eps, freqs_cis)
    assert all(t.is_contiguous() and t.shape == (2, 14, 3, HEAD_DIM) for t in actual)
    for got, want in zip(heads_first(actual), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@runs_kernel_tests_in_a_child
def test_qk_norm_rope_kernel_tests_pass_in_tritons_interpreter():
    assert_passes_in_tritons_interpreter(__file__, "rope_kernel", 4)


# Error of the kernel against the torch ops, relative to |output| + 1 (RMS-normed values are about 1): the
# norm's rounding to the dtype, then the RoPE's;
# Triton's interpreter truncates float32 to bfloat16 instead of rounding, one unit in the last place more.
KERNEL_TOLERANCE = {torch.float16: 2 ** -9, torch.bfloat16: 2 ** -5}


@needs_kernel_device
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("freqs_batch", [1, 2])
def test_qk_norm_rope_kernel_matches_the_torch_ops(dtype, freqs_batch):
    """Two segments, batch 2, a column-sliced segment, 3 heads (masked to the kernel's 4), per-batch or shared
    RoPE matrices with more positions than tokens."""
    qkv, query_weights, key_weights = segments(dtype, device=KERNEL_DEVICE)
    freqs_cis = rope_matrices(17, batch=freqs_batch).to(KERNEL_DEVICE)
    expected = qk_norm_rope.torch_qk_norm_rope(qkv, query_weights, key_weights, None, freqs_cis)
    actual = qk_norm_rope.triton_qk_norm_rope(qkv, query_weights, key_weights, None, freqs_cis)
    for got, want in zip(actual[:2], expected[:2]):
        error = (got.float() - want.float()).abs()
        assert (error <= KERNEL_TOLERANCE[dtype] * (want.float().abs() + 1)).all(), error.max()
    assert torch.equal(actual[2], expected[2])


def test_qk_norm_rope_is_a_custom_op_the_compiler_can_trace():
    qkv, query_weights, key_weights = segments(torch.float32)
    torch.library.opcheck(torch.ops.fluxaccel.qk_norm_rope.default,
                          (qkv, query_weights, key_weights, None, rope_matrices(14)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def compiled_with_rewrite(function):
    """(function compiled by Dynamo with the rewrite applied to its graph and run eagerly, rewrite counts)."""
    counts = []

    def backend(graph_module, example_inputs):
        counts.append(qk_norm_rope_graph_pass.fuse_qk_norm_rope(graph_module))
        return graph_module.forward

    return torch.compile(function, backend=backend, fullgraph=True), counts


def attention_of(function):
    """FLUX's attention on the inputs `function` makes, tokens back to features as ComfyUI does."""
    def attention(*arguments, **keywords):
        query, key, value = function(*arguments, **keywords)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        return out.transpose(1, 2).flatten(2)
    return attention


@pytest.mark.parametrize("segment_count", [1, 2])
def test_rewrite_hands_fluxs_attention_inputs_to_the_fused_op(segment_count):
    """A single block's one segment and a double block's text + image segments: one rewrite each, the same
    attention output."""
    qkv, query_weights, key_weights = (part[:segment_count] for part in segments(torch.float32))
    freqs_cis = rope_matrices(14)
    function = attention_of(flux_attention_inputs)
    compiled, counts = compiled_with_rewrite(function)
    actual = compiled(qkv, query_weights, key_weights, freqs_cis, heads=3)
    assert counts == [1]
    torch.testing.assert_close(actual, function(qkv, query_weights, key_weights, freqs_cis, heads=3))


def scaled_query_inputs(qkv, query_weights, key_weights, freqs_cis, heads):
    """As FLUX, but the queries are scaled after the norm (as an attention patch might): not the fused op's
    computation."""
    queries, keys, values = flux_normed_heads(qkv, query_weights, key_weights, heads)
    return (*torch.ops.comfy_kitchen.apply_rope(queries * 2, keys, freqs_cis), values)


def unnormed_key_inputs(qkv, query_weights, key_weights, freqs_cis, heads):
    queries, _, values = flux_normed_heads(qkv, query_weights, key_weights, heads)
    keys = torch.cat([k for _, k, _ in flux_heads(qkv, heads)], 2)
    return (*torch.ops.comfy_kitchen.apply_rope(queries, keys, freqs_cis), values)


@pytest.mark.parametrize("function", [scaled_query_inputs, unnormed_key_inputs])
def test_rewrite_leaves_other_attention_inputs_alone(function):
    qkv, query_weights, key_weights = segments(torch.float32)
    freqs_cis = rope_matrices(14)
    compiled, counts = compiled_with_rewrite(attention_of(function))
    actual = compiled(qkv, query_weights, key_weights, freqs_cis, heads=3)
    assert counts == [0]
    torch.testing.assert_close(actual, attention_of(function)(qkv, query_weights, key_weights, freqs_cis, heads=3))


def test_rope_matrices_rotate_pairs_as_comfyuis_op():
    """The reference the tests hold the kernel to is ComfyUI's own RoPE."""
    query, key = torch.randn(2, 1, 3, 5, HEAD_DIM).unbind(0)
    freqs_cis = rope_matrices(5)
    for actual, expected in zip((rope.interleaved_rope(query, freqs_cis), rope.interleaved_rope(key, freqs_cis)),
                                torch.ops.comfy_kitchen.apply_rope(query, key, freqs_cis)):
        torch.testing.assert_close(actual, expected)
