"""kernels.fp8 against a float64 reference of e4m3 rounding (CPU); its Triton kernels against the torch ops, and
the compile pass that hands the MLP inputs to the GELU-fusing kernel."""
import re

import pytest
import torch

from fluxaccel.kernels.compile import regional_compile
from fluxaccel.kernels import triton_support
from fluxaccel.kernels.fp8 import graph_pass, quantize as fp8
from tests.support.triton_interpreter import (KERNEL_DEVICE, assert_passes_in_tritons_interpreter, needs_kernel_device,
                                              runs_kernel_tests_in_a_child)

# The compile backend with FP8's graph pass, as Compile FLUX hands it over.
FP8_GRAPH_PASSES = regional_compile.GraphPasses(inductor_options=(graph_pass.inductor_options,))


def e4m3_grid():
    """Every finite float8_e4m3fn value, as float64, ascending."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return values[values.isfinite()].unique()


def round_to_e4m3(values):
    """Round-to-nearest onto the e4m3 grid, in float64 (ties are measure-zero for random data)."""
    grid = e4m3_grid()
    index = torch.searchsorted(grid, values.clamp(grid[0], grid[-1]))
    below, above = grid[(index - 1).clamp(min=0)], grid[index.clamp(max=len(grid) - 1)]
    return torch.where((values - below).abs() <= (above - values).abs(), below, above)


def weights_with_uneven_rows(rows=24, columns=96, seed=0):
    """Trained-like weights (std columns^-1/2) whose rows span six orders of magnitude, plus a zero row."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * columns ** -0.5
    weight *= torch.logspace(-3, 3, rows).unsqueeze(1)
    weight[5] = 0.0
    return weight


def test_quantize_rows_is_round_to_nearest_with_absmax_scales():
    weight = weights_with_uneven_rows()
    qdata, scale = fp8.quantize_rows(weight)

    nonzero = torch.arange(24) != 5
    expected_scale = weight.double().abs().amax(dim=1, keepdim=True) / 448.0
    assert qdata.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (24, 1)
    torch.testing.assert_close(scale[nonzero].double(), expected_scale[nonzero], rtol=1e-7, atol=0)
    assert torch.equal(qdata.double(), round_to_e4m3(weight.double() / scale.double()))
    assert qdata.double().abs().amax(dim=1)[nonzero].eq(448.0).all(), "each row's absmax maps to 448"
    assert qdata[5].double().eq(0).all() and scale[5].item() > 0


def test_dequantized_rows_keep_every_row_to_e4m3_precision():
    """Per-row scales: a row 10^6 times smaller than another is as precise (no flush to zero)."""
    weight = weights_with_uneven_rows()
    qdata, scale = fp8.quantize_rows(weight)
    restored = fp8.dequantize_rows(qdata, scale, torch.float64)
    per_row = (restored - weight.double()).norm(dim=1) / weight.double().norm(dim=1)
    nonzero = torch.arange(24) != 5
    assert per_row[nonzero].max() < 0.04
    assert torch.equal(restored[5], torch.zeros(96, dtype=torch.float64))


def test_chunked_weight_quantization_equals_whole(monkeypatch):
    weight = weights_with_uneven_rows(rows=37).to(torch.float16)
    monkeypatch.setattr(fp8, "QUANTIZE_CHUNK_ELEMENTS", 96 * 5)
    qdata, scale = fp8.quantize_weight_rows(weight, torch.bfloat16)
    expected_qdata, expected_scale = fp8.quantize_rows(weight.to(torch.bfloat16))
    assert torch.equal(qdata.view(torch.uint8), expected_qdata.view(torch.uint8))
    assert torch.equal(scale, expected_scale)


def test_whole_tensor_scale():
    activations = torch.randn(8, 64) * 30
    qdata, scale = fp8.quantize_whole(activations)
    assert scale.shape == (1, 1)
    torch.testing.assert_close(scale.double(), activations.double().abs().max().reshape(1, 1) / 448.0, rtol=1e-7, atol=0)
    assert torch.equal(qdata.double(), round_to_e4m3(activations.double() / scale.double()))


def trained_like_layer(tokens=64, in_features=128, out_features=96, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5
    bias = torch.randn(out_features, generator=generator) * 0.1
    return x, weight, bias


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def test_weight_only_linear_is_the_dequantized_matmul():
    x, weight, bias = trained_like_layer()
    qdata, scale = fp8.quantize_rows(weight)
    assert not fp8.fp8_matmul_supported("cpu")
    out = fp8.fp8_linear(x, qdata, scale, bias)
    assert out.shape == (2, 32, 96) and out.dtype == x.dtype
    assert torch.equal(out, torch.nn.functional.linear(x, fp8.dequantize_rows(qdata, scale, x.dtype), bias))
    reference = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    assert relative_error(out, reference) < 0.04


@pytest.mark.parametrize("activation_scaling", fp8.ACTIVATION_SCALINGS)
def test_scaled_mm_linear_matches_the_float64_w8a8_reference(activation_scaling):
    """The FP8 tensor-core path's math against float64: on a GPU where there is one (torch 2.11's CPU
    _scaled_mm takes whole-tensor scales only), else on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, weight, bias = trained_like_layer()
    x = x.to(torch.bfloat16)
    qdata, scale = fp8.quantize_rows(weight)
    out = fp8.scaled_mm_linear(x.to(device), qdata.to(device), scale.to(device), bias.to(torch.bfloat16).to(device),
                               activation_scaling).cpu()

    rows = x.reshape(-1, 128).double()
    x_scale = (rows.abs().amax(dim=1, keepdim=True) if activation_scaling == "row" else rows.abs().max()) / 448.0
    w8a8 = (round_to_e4m3(rows / x_scale) * x_scale) @ (qdata.double() * scale.double()).t() + bias.to(torch.bfloat16).double()
    assert out.shape == (2, 32, 96) and out.dtype == torch.bfloat16
    assert relative_error(out.reshape(-1, 96), w8a8) < 2 ** -7, "bf16 output rounding only"
    exact = torch.nn.functional.linear(x.double(), weight.double(), bias.to(torch.bfloat16).double())
    assert relative_error(out, exact) < 0.05


def one_row_layer(in_features=300, out_features=40, seed=2):
    """A row, FP8 weight (data, scales) and bias; by default sizes that are no multiples of the kernel's blocks."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, in_features, generator=generator).to(torch.bfloat16)
    qdata, scale = fp8.quantize_rows(torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5)
    bias = (torch.randn(out_features, generator=generator) * 0.1).to(torch.bfloat16)
    return tuple(t.to(KERNEL_DEVICE) for t in (x, qdata, scale, bias))


@needs_kernel_device
def test_one_row_gemv_kernel_is_the_weight_only_matmul():
    """Against float64 of the same FP8 weight and the unquantized row: only the float32 sums and the outputs'
    rounding to bf16 differ."""
    x, qdata, scale, bias = one_row_layer()
    weight = qdata.double() * scale.double()
    for layer_bias in (bias, None):
        out = fp8.one_row_linear(x, qdata, scale, layer_bias)
        expected = x.double() @ weight.t() + (0 if layer_bias is None else layer_bias.double())
        assert out.shape == (1, 40) and out.dtype == torch.bfloat16
        assert relative_error(out.cpu(), expected.cpu()) < 2 ** -8


@needs_kernel_device
def test_one_row_gemv_kernel_is_a_custom_op_the_compiler_can_trace():
    x, qdata, scale, bias = one_row_layer()
    for layer_bias in (bias, None):
        # Not opcheck's test_schema: it multiplies the inputs, which torch cannot do to an FP8 tensor on the CPU.
        torch.library.opcheck(torch.ops.fluxaccel.one_row_linear.default, (x, qdata, scale, layer_bias),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8.fp8_matmul_supported("cuda")),
                    reason="needs FP8 tensor cores")
def test_fp8_layers_on_one_row_read_the_weight_in_the_gemv_kernel():
    x, qdata, scale, bias = one_row_layer(in_features=320, out_features=48)  # sizes _scaled_mm takes
    assert torch.equal(fp8.fp8_linear(x.unsqueeze(0), qdata, scale, bias)[0], fp8.one_row_linear(x, qdata, scale, bias))
    rows = torch.cat([x, x])  # more rows: the FP8 tensor-core GEMM, activations quantized
    assert not torch.equal(fp8.fp8_linear(rows, qdata, scale, bias)[:1], fp8.one_row_linear(x, qdata, scale, bias))


@runs_kernel_tests_in_a_child
def test_gemv_kernel_tests_pass_in_tritons_interpreter():
    assert_passes_in_tritons_interpreter(__file__, "gemv_kernel", 2)


@runs_kernel_tests_in_a_child
def test_row_kernel_tests_pass_in_tritons_interpreter():
    assert_passes_in_tritons_interpreter(__file__, "row_kernel", 11)


def cast_as_the_kernel_does(values):
    """values.to(float8_e4m3fn) by Triton's own conversion. Its CPU interpreter rounds ties, subnormals and
    carries into the next power of two otherwise than a GPU (seen with Triton 3.8), so on the CPU the kernel
    is held to the torch quantization's scaled values cast this way; on a GPU, to torch's bytes."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(values_ptr, out_ptr, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        tl.store(out_ptr + offsets, tl.load(values_ptr + offsets, mask=inside).to(tl.float8e4nv), mask=inside)

    values = values.contiguous()
    out = torch.empty(values.shape, dtype=torch.float8_e4m3fn, device=values.device)
    cast[(triton.cdiv(values.numel(), 1024),)](values, out, values.numel(), BLOCK=1024)
    return out


@needs_kernel_device
@pytest.mark.parametrize("features", [12288, 15360, 9000])
def test_wide_row_kernel_gives_the_bytes_of_the_torch_quantization(features):
    """Rows spanning six orders of magnitude, a zero row, bf16 and float32, taken as a column slice of a
    wider tensor (the kernel follows the row stride), a width that is not a power of two (masked)."""
    generator = torch.Generator().manual_seed(features)
    wider = torch.randn(6, features + 40, generator=generator) * torch.logspace(-3, 3, 6).unsqueeze(1)
    wider[2] = 0.0
    for dtype in (torch.bfloat16, torch.float32):
        rows = wider.to(dtype).to(KERNEL_DEVICE)[:, 40:]
        qdata, scale = fp8.quantize_wide_rows(rows)
        expected_qdata, expected_scale = fp8.quantize_rows(rows)
        if KERNEL_DEVICE == "cpu":
            expected_qdata = cast_as_the_kernel_does((rows.float() / expected_scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX))
        assert qdata.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and torch.equal(scale, expected_scale)
        same = qdata.view(torch.uint8) == expected_qdata.view(torch.uint8)
        assert same.all(), f"{(~same).sum().item()} of {same.numel()} bytes differ ({dtype})"


@needs_kernel_device
def test_wide_row_kernel_is_a_custom_op_the_compiler_can_trace():
    """Schema, fake (meta) implementation and dynamic shapes, as torch.compile uses them."""
    rows = torch.randn(4, 12288, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.fluxaccel.quantize_wide_rows.default, (rows,),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# FLUX's single blocks' linear1 output: q, k, v (3 x 3072), then the MLP's 12288 pre-activations.
QKV_FEATURES, MLP_FEATURES = 9216, 12288


def gelu(x, approximate="tanh"):
    return torch.nn.functional.gelu(x, approximate=approximate)


def mlp_rows(prefix_features, rows=6, seed=0):
    """(prefix or None, pre-activation) in bf16 on the kernel's device: the pre-activation a column slice of a
    wider layer output, as in the single blocks; rows from 1e-3 to 1e3 in magnitude (the kernel finds the
    GELU's absmax from the largest input in the large rows, from every GELU in the small ones), a zero row."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-3, 3, rows).unsqueeze(1)
    layer_output = torch.randn(rows, QKV_FEATURES + MLP_FEATURES, generator=generator) * magnitudes
    prefix = torch.randn(rows, prefix_features, generator=generator) * magnitudes
    layer_output[2], prefix[2] = 0.0, 0.0
    pre_activation = layer_output.to(torch.bfloat16).to(KERNEL_DEVICE)[:, QKV_FEATURES:]
    return (prefix.to(torch.bfloat16).to(KERNEL_DEVICE) if prefix_features else None), pre_activation


@needs_kernel_device
@pytest.mark.parametrize("prefix_features", [0, 3072])
def test_gelu_row_kernel_quantizes_the_concatenated_gelu(prefix_features):
    """The torch quantization of cat(prefix, gelu(x)) computed in float32 (the kernel skips the GELU module's
    rounding to bf16), cast by Triton; where its cast is right (a GPU), also e4m3's round to nearest of the
    float64 values. Bytes may differ where the kernel's sigmoid and torch's tanh round differently."""
    prefix, pre_activation = mlp_rows(prefix_features)
    qdata, scale = fp8.quantize_gelu_rows(prefix, pre_activation)

    parts = [gelu(pre_activation.float())] if prefix is None else [prefix.float(), gelu(pre_activation.float())]
    rows = torch.cat(parts, 1)
    expected_scale = (rows.abs().amax(1, keepdim=True) * fp8.INVERSE_FP8_MAX).clamp(min=fp8.SCALE_FLOOR)
    assert qdata.shape == rows.shape and qdata.dtype == torch.float8_e4m3fn
    assert torch.allclose(scale, expected_scale, rtol=2 ** -20, atol=0)
    expected_qdata = cast_as_the_kernel_does((rows / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX))
    assert (qdata.view(torch.uint8) != expected_qdata.view(torch.uint8)).float().mean() < 1e-3
    assert (qdata[2].float() == 0).all(), "an all-zero row quantizes to zeros"
    if KERNEL_DEVICE == "cuda":
        exact = rows.double()
        dequantized = qdata.double() * scale.double()
        # Half an e4m3 step: 2^-4 relative, or 2^-10 of the scale among the subnormals.
        assert ((dequantized - exact).abs() <= 2 ** -4 * 1.001 * exact.abs() + 2 ** -10 * scale.double()).all()


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.version.hip is None), reason="needs an NVIDIA GPU")
def test_gelu_row_kernel_gives_the_same_bytes_with_the_ptx_reciprocal(monkeypatch):
    """On an NVIDIA GPU the GELU's division is rcp.approx's reciprocal times x: the bytes of the division."""
    generator = torch.Generator().manual_seed(3)
    layer_output = (torch.randn(256, QKV_FEATURES + MLP_FEATURES, generator=generator) * 2).to(torch.bfloat16).cuda()
    prefix = torch.randn(256, 3072, generator=generator).to(torch.bfloat16).cuda()
    pre_activation = layer_output[:, QKV_FEATURES:]
    assert fp8.compiles_to_ptx(pre_activation)
    qdata, scale = fp8.quantize_gelu_rows(prefix, pre_activation)
    monkeypatch.setattr(fp8, "compiles_to_ptx", lambda tensor: False)
    divided_qdata, divided_scale = fp8.quantize_gelu_rows(prefix, pre_activation)
    assert torch.equal(scale, divided_scale)
    assert (qdata.view(torch.uint8) != divided_qdata.view(torch.uint8)).sum() <= qdata.numel() * 1e-6


@needs_kernel_device
def test_gelu_row_kernel_is_a_custom_op_the_compiler_can_trace():
    prefix, pre_activation = mlp_rows(3072)
    for arguments in ((prefix, pre_activation), (None, pre_activation)):
        torch.library.opcheck(torch.ops.fluxaccel.quantize_gelu_rows.default, arguments,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def single_block_mlp_input(layer_output, attention):
    """FLUX's single blocks: attention [batch, heads, tokens, head_dim] to tokens, cat(attention, gelu(mlp))."""
    batch, heads, tokens, head_dim = attention.shape
    attention = attention.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    rows = torch.cat((attention, gelu(layer_output[..., QKV_FEATURES:])), 2)
    return fp8.quantize_wide_rows(rows.reshape(-1, rows.shape[-1]))


def double_block_mlp_input(layer_output):
    activated = gelu(layer_output[..., QKV_FEATURES:])
    return fp8.quantize_wide_rows(activated.reshape(-1, activated.shape[-1]))


def fluxaccel_calls_run_by(function, *arguments):
    """(outputs, the fluxaccel:: ops called with their arguments' source) of `function` compiled with the pack's
    backend, read from the code inductor generates (compiled anew: a graph from inductor's cache brings no code to
    read)."""
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(function, backend=regional_compile.shared_inductor_backend(passes=FP8_GRAPH_PASSES),
                             fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):
        outputs, sources = run_and_get_code(compiled, *arguments)
    return outputs, re.findall(r"torch\.ops\.fluxaccel\.(\w+)\.default\((.*)\)$", "\n".join(sources), re.M)


def fluxaccel_ops_run_by(function, *arguments):
    """(outputs, the fluxaccel:: ops called) of `function` compiled with the pack's backend."""
    outputs, calls = fluxaccel_calls_run_by(function, *arguments)
    return outputs, {op for op, _ in calls}


def flux_mlp_tensors(tokens=8):
    generator = torch.Generator().manual_seed(3)
    layer_output = torch.randn(1, tokens, QKV_FEATURES + MLP_FEATURES, generator=generator).to(torch.bfloat16).to(KERNEL_DEVICE)
    attention = torch.randn(1, 24, tokens, 128, generator=generator).to(torch.bfloat16).to(KERNEL_DEVICE)
    return layer_output, attention


@needs_kernel_device
def test_gelu_row_kernel_takes_over_the_mlp_inputs_in_compiled_graphs():
    """The pack's compile backend rewrites quantize_wide_rows([attention,] gelu(h)) into one quantize_gelu_rows
    that reads h and the attention output where they lie, with the fused op's own results."""
    layer_output, attention = flux_mlp_tensors()
    tokens_attention = attention.transpose(1, 2).reshape(8, 3072)
    (qdata, scale), ops = fluxaccel_ops_run_by(single_block_mlp_input, layer_output, attention)
    assert ops == {"quantize_gelu_rows"}
    expected = fp8.quantize_gelu_rows(tokens_attention, layer_output[0, :, QKV_FEATURES:])
    assert torch.equal(qdata.view(torch.uint8), expected[0].view(torch.uint8)) and torch.equal(scale, expected[1])

    (qdata, scale), ops = fluxaccel_ops_run_by(double_block_mlp_input, layer_output)
    assert ops == {"quantize_gelu_rows"}
    expected = fp8.quantize_gelu_rows(None, layer_output[0, :, QKV_FEATURES:])
    assert torch.equal(qdata.view(torch.uint8), expected[0].view(torch.uint8)) and torch.equal(scale, expected[1])


def exact_gelu_rows(layer_output):
    return fp8.quantize_wide_rows(gelu(layer_output[0, :, QKV_FEATURES:], approximate="none"))


def gelu_of_gelu_rows(layer_output):
    return fp8.quantize_wide_rows(gelu(gelu(layer_output[0, :, QKV_FEATURES:])))


def rows_joined_along_tokens(layer_output):
    """cat along the token dimension: the quantized rows are not [prefix, gelu] rows."""
    rows = torch.cat((layer_output[0, :, :MLP_FEATURES], gelu(layer_output[0, :, QKV_FEATURES:])), 0)
    return fp8.quantize_wide_rows(rows)


@needs_kernel_device
@pytest.mark.parametrize("function", [exact_gelu_rows, gelu_of_gelu_rows, rows_joined_along_tokens])
def test_row_kernel_fusion_leaves_other_inputs_to_quantize_wide_rows(function):
    layer_output, _ = flux_mlp_tensors()
    _, ops = fluxaccel_ops_run_by(function, layer_output)
    assert ops == {"quantize_wide_rows"}


def block_input_tensors(batch=2, tokens=6, features=3072, shared_modulation=False, seed=4):
    """FLUX's block input in bf16 on the kernel's device: x [batch, tokens, features], its rows from 1e-2 to 1e2 in
    magnitude around offsets, and the modulation [batch or 1, 1, 2 * features] that shift and scale come from."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-2, 2, tokens).view(1, tokens, 1)
    x = torch.randn(batch, tokens, features, generator=generator) * magnitudes
    x += torch.randn(batch, tokens, 1, generator=generator) * magnitudes
    modulation = torch.randn(1 if shared_modulation else batch, 1, 2 * features, generator=generator) * 0.3
    return x.to(torch.bfloat16).to(KERNEL_DEVICE), modulation.to(torch.bfloat16).to(KERNEL_DEVICE)


def shift_and_scale(modulation):
    """A block input's modulation [.., 2 * features] split as ComfyUI's FLUX blocks split it."""
    return modulation.chunk(2, -1)


def layer_norm_modulation(modulation):
    """(mult, shift) as ComfyUI's FLUX blocks modulate: 1 + scale and shift."""
    shift, scale = shift_and_scale(modulation)
    return 1 + scale, shift


def block_input_rows(x, modulation, affine=None):
    """The FP8 rows of a FLUX block's first linear layer, computed as its blocks do."""
    mult, shift = layer_norm_modulation(modulation)
    normalized = torch.nn.functional.layer_norm(x, (x.shape[-1],), affine, affine, eps=1e-6)
    return fp8.quantize_rows(torch.addcmul(shift, normalized, mult).reshape(-1, x.shape[-1]))


@needs_kernel_device
@pytest.mark.parametrize("features,shared_modulation", [(3072, False), (3072, True), (320, False)])
def test_layer_norm_kernel_quantizes_the_modulated_rows(features, shared_modulation):
    """e4m3's precision against the float64 rows; on a GPU also the torch ops' rows: scales within a bf16 step of
    the row's absmax, bytes but for rounding. (Triton's interpreter casts to bf16 and e4m3 toward zero, a whole
    e4m3 step off at worst, where a GPU rounds to nearest.)"""
    x, modulation = block_input_tensors(features=features, shared_modulation=shared_modulation)
    mult, shift = layer_norm_modulation(modulation)
    qdata, scale = fp8.quantize_modulated_layer_norm(x, mult, shift, 1e-6)
    assert qdata.shape == (12, features) and qdata.dtype == torch.float8_e4m3fn and scale.shape == (12, 1)
    normalized = torch.nn.functional.layer_norm(x.double(), (features,), eps=1e-6)
    exact = (normalized * mult.double() + shift.double()).reshape(-1, features)
    exact_scale = exact.abs().amax(1, keepdim=True) / fp8.FP8_MAX
    torch.testing.assert_close(scale.double(), exact_scale, rtol=2 ** -5, atol=0)
    errors = (qdata.double() * scale.double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert errors.max() < (0.04 if KERNEL_DEVICE == "cuda" else 0.1)
    if KERNEL_DEVICE == "cuda":
        expected_qdata, expected_scale = block_input_rows(x, modulation)
        torch.testing.assert_close(scale, expected_scale, rtol=2 ** -7, atol=0)
        assert (qdata.view(torch.uint8) != expected_qdata.view(torch.uint8)).float().mean() < 1e-3


@needs_kernel_device
def test_layer_norm_kernel_adds_one_to_the_scale_as_the_model_does():
    """1 + scale computed in the kernel gives the same bytes as 1 + scale computed by torch in bf16 (on a GPU;
    Triton's interpreter rounds the kernel's sum toward zero, where torch rounds to nearest)."""
    x, modulation = block_input_tensors()
    shift, scale = shift_and_scale(modulation)
    summed = fp8.quantize_modulated_layer_norm(x, 1 + scale, shift, 1e-6)
    folded = fp8.quantize_modulated_layer_norm(x, scale, shift, 1e-6, one_plus_mult=True)
    differing = (folded[0].view(torch.uint8) != summed[0].view(torch.uint8)).float().mean().item()
    if KERNEL_DEVICE == "cuda":
        assert differing == 0 and torch.equal(folded[1], summed[1])
    else:  # a bf16 step of 1 + scale off in half the columns: 5 % of the bytes an e4m3 step off
        assert differing < 0.1
        torch.testing.assert_close(folded[1], summed[1], rtol=2 ** -7, atol=0)


@needs_kernel_device
@pytest.mark.parametrize("one_plus_mult", [False, True])
def test_layer_norm_kernel_is_a_custom_op_the_compiler_can_trace(one_plus_mult):
    x, modulation = block_input_tensors(features=320)
    shift, scale = shift_and_scale(modulation)
    torch.library.opcheck(torch.ops.fluxaccel.quantize_modulated_layer_norm.default,
                          (x, scale if one_plus_mult else 1 + scale, shift, 1e-6, one_plus_mult),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def block_input_as_a_sum(x, modulation):
    """The modulation written out (as inductor may decompose addcmul): shift + norm * mult."""
    mult, shift = layer_norm_modulation(modulation)
    normalized = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return fp8.quantize_rows((shift + normalized * mult).reshape(-1, x.shape[-1]))


def block_input_with_an_unrounded_norm(x, modulation):
    """As torch 2.11's inductor leaves addcmul(shift, layer_norm(x), mult) on a GPU: without the norm's rounding
    to bf16 before addcmul's upcast."""
    mult, shift = layer_norm_modulation(modulation)
    upcast = x.float()
    variance, mean = torch.var_mean(upcast, -1, correction=0, keepdim=True)
    normalized = (upcast - mean) * torch.rsqrt(variance + 1e-6)
    return fp8.quantize_rows((shift.float() + normalized * mult.float()).to(x.dtype).reshape(-1, x.shape[-1]))


@needs_kernel_device
@pytest.mark.parametrize("function", [block_input_rows, block_input_as_a_sum, block_input_with_an_unrounded_norm])
@pytest.mark.parametrize("shared_modulation", [False, True])
def test_layer_norm_kernel_takes_over_the_block_inputs_in_compiled_graphs(function, shared_modulation):
    """The pack's compile backend hands layer norm + modulation + FP8 rows of a graph input to the kernel."""
    x, modulation = block_input_tensors(shared_modulation=shared_modulation)
    (qdata, scale), calls = fluxaccel_calls_run_by(function, x, modulation)
    assert [op for op, _ in calls] == ["quantize_modulated_layer_norm"]
    assert calls[0][1].endswith("True"), "the kernel adds 1 + scale's 1, no kernel writes the sum out"
    shift, scale_term = shift_and_scale(modulation)
    expected = fp8.quantize_modulated_layer_norm(x, scale_term, shift, 1e-6, one_plus_mult=True)
    assert torch.equal(qdata.view(torch.uint8), expected[0].view(torch.uint8)) and torch.equal(scale, expected[1])


def addcmul_as_an_fma(self, tensor1, tensor2, *, value=1):
    return torch._inductor.inductor_prims.fma(tensor1.float() * value, tensor2.float(), self.float()).to(self.dtype)


def addcmul_as_an_upcast_sum(self, tensor1, tensor2, *, value=1):
    return (self.float() + value * tensor1.float() * tensor2.float()).to(self.dtype)


@pytest.fixture
def inductor_addcmul_decomposition(monkeypatch):
    """Installs an inductor decomposition of addcmul (torch releases and devices differ in whether and how
    inductor decomposes it) for the test's compilations."""
    from torch._inductor import decomposition

    def install(function):
        monkeypatch.setitem(decomposition.decompositions, torch.ops.aten.addcmul.default, function)
        decomposition.fast_random_decomps.cache_clear()

    yield install
    monkeypatch.undo()
    decomposition.fast_random_decomps.cache_clear()


@needs_kernel_device
@pytest.mark.parametrize("decomposition", [addcmul_as_an_fma, addcmul_as_an_upcast_sum])
def test_layer_norm_kernel_takes_over_decomposed_addcmul(inductor_addcmul_decomposition, decomposition):
    inductor_addcmul_decomposition(decomposition)
    x, modulation = block_input_tensors()
    _, ops = fluxaccel_ops_run_by(block_input_rows, x, modulation)
    assert ops == {"quantize_modulated_layer_norm"}


def block_input_with_affine_weights(x, modulation):
    return block_input_rows(x, modulation, affine=torch.ones(x.shape[-1], dtype=x.dtype, device=x.device))


def block_input_after_a_residual_add(x, modulation):
    return block_input_rows(x + x.flip(1), modulation)


def block_input_quantized_whole(x, modulation):
    mult, shift = layer_norm_modulation(modulation)
    normalized = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return fp8.quantize_whole(torch.addcmul(shift, normalized, mult).reshape(-1, x.shape[-1]))


def block_input_normalized_over_tokens(x, modulation):
    return block_input_rows(x.transpose(1, 2).contiguous(), modulation[:, :, :12])


@needs_kernel_device
@pytest.mark.parametrize("function", [block_input_with_affine_weights, block_input_after_a_residual_add,
                                      block_input_quantized_whole, block_input_normalized_over_tokens])
def test_layer_norm_kernel_fusion_leaves_other_quantizations_to_inductor(function):
    x, modulation = block_input_tensors()
    _, ops = fluxaccel_ops_run_by(function, x, modulation)
    assert ops == set()


@runs_kernel_tests_in_a_child
def test_layer_norm_kernel_tests_pass_in_tritons_interpreter():
    assert_passes_in_tritons_interpreter(__file__, "layer_norm_kernel", 18)


def test_only_wide_rows_on_a_gpu_take_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(fp8, "quantize_wide_rows", lambda rows: calls.append(rows.shape) or fp8.quantize_rows(rows))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda tensor: True))
    for features in (3072, 8192, 15360, 16385):
        fp8.quantize_activation(torch.randn(2, features), "row")
    fp8.quantize_activation(torch.randn(2, 12288), "tensor")
    assert calls == [(2, 8192), (2, 15360)]
    monkeypatch.setattr(triton_support, "TRITON_INSTALLED", False)
    fp8.quantize_activation(torch.randn(2, 12288), "row")
    assert calls == [(2, 8192), (2, 15360)], "without Triton the torch ops quantize"


def test_layer_selection_patterns():
    names = ["img_in", "img_in_extra", "double_blocks.0.img_mod.lin", "double_blocks.10.img_attn.qkv",
             "single_blocks.1.linear1", "single_blocks.12.linear1", "final_layer.linear"]
    targets, kept = fp8.select_layers(names, ["img_in", "final_layer", "*.img_mod.lin", "single_blocks.1"])
    assert kept == ["img_in", "double_blocks.0.img_mod.lin", "single_blocks.1.linear1", "final_layer.linear"]
    assert targets == ["img_in_extra", "double_blocks.10.img_attn.qkv", "single_blocks.12.linear1"]


def test_linear_layer_names_lists_linear_modules_only():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    assert fp8.linear_layer_names(module) == ["0", "2.0"]
