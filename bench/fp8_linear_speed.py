"""One FLUX.1-dev linear layer at 1024² (4608 tokens) under torch.compile: bf16 against three FP8 paths.

- core: ComfyUI's fp8_e4m3fn_fast math: the activation clamped to ±448 and cast with scale 1, the
  weight stored as e4m3 with scale 1, a tensor-wise `torch._scaled_mm`.
- rowwise: the pack's FP8 Dynamic Quantize, the shipped `kernels/fp8/quantize.py` `fp8_linear` (per-token
  activation scales, per-row weight scales, a row-wise `torch._scaled_mm`; wide rows through its Triton kernel).
- epilogue: the shipped row-wise quantization with a tensor-wise `_scaled_mm` and both scales and the bias
  applied to its output in float32 (alone here; inside a block it could fuse with the next op).
- tensorwise: the shipped `fp8_linear` with activation_scaling "tensor" (one scale per call) on the per-row weights.
Each call includes a layer norm before and nothing after, so the quantization can fuse with its
producer as it does inside a FLUX block. Times are CUDA-event means of 50 calls (ms).

    python -m bench.fp8_linear_speed          (needs an FP8 GPU)
"""
import torch

from tests.support import flux_fixtures

# The pack's kernels as the pack ships them: this checkout imported as `fluxaccel`, as the tests do.
flux_fixtures.import_pack()
from fluxaccel.kernels.fp8 import quantize as fp8  # noqa: E402

MAX = fp8.FP8_MAX
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 18432)]


def producer(x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:]) * 1.1 + 0.1


def rowwise(x, wq, ws, b):
    return fp8.fp8_linear(producer(x), wq, ws, b, "row")


def epilogue(x, wq, ws, b):
    one = torch.ones((), device=x.device)
    xq, xs = fp8.quantize_activation(producer(x), "row")
    out = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return (out.float() * xs * ws.t() + b.float()).to(torch.bfloat16)


def tensorwise(x, wq, ws, b):
    return fp8.fp8_linear(producer(x), wq, ws, b, "tensor")


def core(x, w8, ws, b):
    one = torch.ones((), device=x.device)
    xq = producer(x).clamp(-MAX, MAX).to(fp8.FP8_DTYPE)
    return torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one, bias=b, out_dtype=torch.bfloat16)


def bf16(x, w, ws, b):
    return torch.nn.functional.linear(producer(x), w, b)


def milliseconds(fn, *args, calls=50):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main():
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    print("M K N | bf16 core rowwise epilogue tensorwise (ms, compiled)")
    for in_features, out_features in SHAPES:
        tokens = 1 if out_features == 18432 else 4608  # the modulation layer runs on one row per image
        x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * in_features ** -0.5
        b = torch.zeros(out_features, device="cuda", dtype=torch.bfloat16)
        wq, ws = fp8.quantize_weight_rows(w, torch.bfloat16)
        cases = [(bf16, w), (core, w.to(fp8.FP8_DTYPE)), (rowwise, wq), (epilogue, wq), (tensorwise, wq)]
        times = [milliseconds(torch.compile(fn), x, weight, ws, b) for fn, weight in cases]
        print(tokens, in_features, out_features, "|", " ".join(f"{t:.3f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
