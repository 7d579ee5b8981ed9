"""The pack's FP8 weights as one of ComfyUI's QuantizedTensor layouts (comfy_kitchen).

Being a QuantizedTensor, an FP8 weight is what ComfyUI already knows how to size, move, pin, offload
and dequantize (`cast_bias_weight` dequantizes it for layers run offloaded). `torch.nn.functional.linear`
reaches the handlers below as `aten.t` on the weight, then `aten.addmm` (or `aten.mm` without bias),
which run `kernels.fp8.fp8_linear`; any other op sees the dequantized weight.
"""
import dataclasses

import torch

from ..kernels.fp8 import quantize as fp8
from .comfy_contract import quantized_data, quantized_layout_name, quantized_params, quantized_tensor_api

(QuantizedLayout, QuantizedTensor, register_layout_class, register_layout_op, BaseLayoutParams,
 dequantize_args) = quantized_tensor_api()

LAYOUT_NAME = "FluxAccelFP8RowwiseLayout"


class FP8RowwiseLayout(QuantizedLayout):
    """FP8 e4m3 weight [out, in] with a float32 scale per output row; activations scaled at run time."""

    MIN_SM_VERSION = fp8.MIN_FP8_MATMUL_CAPABILITY

    @dataclasses.dataclass(frozen=True)
    class Params(BaseLayoutParams):
        activation_scaling: str = "row"
        # aten.t gives a transposed view: the data stays [out, in], the logical shape is [in, out].
        transposed: bool = False

    @classmethod
    def quantize(cls, tensor, activation_scaling="row", dtype=None, **comfy_requantize_options):
        """Quantizes `tensor.to(dtype)` (default: its own dtype), whose dtype the weight then reports.

        ComfyUI passes scale="recalculate" and a stochastic-rounding seed when it requantizes a
        weight it patched on the fly; this layout always recalculates and rounds to nearest, so the
        same merged weight gives the same bytes whichever path produced it.
        """
        dtype = dtype or tensor.dtype
        qdata, scale = fp8.quantize_weight_rows(tensor, dtype)
        return qdata, cls.Params(scale=scale, orig_dtype=dtype, orig_shape=tuple(tensor.shape),
                                 activation_scaling=activation_scaling)

    @classmethod
    def dequantize(cls, qdata, params):
        return fp8.dequantize_rows(qdata, params.scale, params.orig_dtype)

    @classmethod
    def get_plain_tensors(cls, qtensor):
        return quantized_data(qtensor), quantized_params(qtensor).scale

    @classmethod
    def state_dict_tensors(cls, qdata, params):
        return {"": qdata, "_scale": params.scale}

    @classmethod
    def requantize_kwargs(cls, qtensor):
        return {"activation_scaling": quantized_params(qtensor).activation_scaling}


register_layout_class(LAYOUT_NAME, FP8RowwiseLayout)


def quantize_weight(weight, dtype, activation_scaling):
    """The FP8 QuantizedTensor of a float weight [out, in] cast to `dtype` (the model's weight dtype)."""
    return QuantizedTensor.from_float(weight, LAYOUT_NAME, activation_scaling=activation_scaling, dtype=dtype)


def is_fp8_weight(tensor):
    return isinstance(tensor, QuantizedTensor) and quantized_layout_name(tensor) == LAYOUT_NAME


def is_transposed_weight(tensor):
    return is_fp8_weight(tensor) and quantized_params(tensor).transposed


def run_linear(x, transposed_weight, bias):
    params = quantized_params(transposed_weight)
    return fp8.fp8_linear(x, quantized_data(transposed_weight), params.scale, bias, params.activation_scaling)


@register_layout_op(torch.ops.aten.t.default, FP8RowwiseLayout)
def transpose(qt, args, kwargs):
    weight = args[0]
    params = quantized_params(weight)
    params = dataclasses.replace(params, transposed=not params.transposed,
                                 orig_shape=tuple(reversed(params.orig_shape)))
    return QuantizedTensor(quantized_data(weight), LAYOUT_NAME, params)


@register_layout_op(torch.ops.aten.addmm.default, FP8RowwiseLayout)
def addmm(qt, args, kwargs):
    bias, x, weight = args
    if kwargs or isinstance(x, QuantizedTensor) or not is_transposed_weight(weight):
        return torch.addmm(*dequantize_args(args), **kwargs)
    return run_linear(x, weight, bias)


@register_layout_op(torch.ops.aten.mm.default, FP8RowwiseLayout)
def mm(qt, args, kwargs):
    x, weight = args
    if isinstance(x, QuantizedTensor) or not is_transposed_weight(weight):
        return torch.mm(*dequantize_args(args))
    return run_linear(x, weight, None)
