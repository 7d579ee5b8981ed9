"""The inductor heuristics Compile FLUX compiles under, seen in the Triton code inductor writes (GPU only)."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fluxaccel.kernels.fp8 import quantize as fp8
from fluxaccel.kernels.compile.regional_compile import CountingInductorBackend

HIDDEN = 3072
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor writes Triton kernels for GPUs only")


def flux_linear_input(x, shift, scale):
    """A FLUX block's first layer input, as its compiled graph computes it: layer norm, modulation, FP8 rows."""
    normed = torch.nn.functional.layer_norm(x, (HIDDEN,), eps=1e-6)
    return fp8.quantize_rows(torch.addcmul(shift, normed, 1 + scale))


def triton_code(backend, *inputs):
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        result, code = run_and_get_code(torch.compile(flux_linear_input, backend=backend), *inputs)
    return result, "\n".join(code)


@needs_gpu
def test_flux_rows_are_layer_normed_and_quantized_in_one_pass():
    generator = torch.Generator(device="cuda").manual_seed(0)
    x, shift, scale = (torch.randn(rows, HIDDEN, device="cuda", generator=generator, dtype=torch.bfloat16)
                       for rows in (512, 1, 1))

    (qdata, scales), code = triton_code(CountingInductorBackend(), x, shift, scale)
    _, inductors_own_code = triton_code("inductor", x, shift, scale)

    assert "triton_per_" in code and "triton_red_" not in code
    assert "triton_red_" in inductors_own_code  # what the heuristics change: inductor alone loops over the rows
    # The rows in float64: inductor's kernel computes in float32, so its FP8 rows are e4m3's rounding of them.
    exact = torch.addcmul(shift.double(), torch.nn.functional.layer_norm(x.double(), (HIDDEN,), eps=1e-6),
                          1 + scale.double())
    exact_scales = exact.abs().amax(1, keepdim=True) / fp8.FP8_MAX
    torch.testing.assert_close(scales.double(), exact_scales, rtol=1e-4, atol=0)
    # Half an e4m3 step (2^-4 relative, or 2^-10 of the scale among the subnormals), with room for float32
    # rounding and a bf16 rounding of `1 + scale` moving a value across a rounding boundary.
    error = (qdata.double() * scales.double() - exact).abs()
    assert (error <= 2 ** -4 * 1.04 * exact.abs() + 2 ** -10 * exact_scales).all()
