"""An inductor graph pass: what FP8 layers' inputs are computed from goes into their quantization kernels.

The MLPs' GELU:
FLUX's second MLP layers read `gelu(h)` (double blocks) or `cat(attention, gelu(h))` (single blocks),
rows 12288 and 15360 wide. Their FP8 activations come from `quantize_wide_rows`, a custom op, so
inductor first writes the GELU and the concatenation out in bf16 and the op reads them back: on an
H200, 112 + 80 us per single-block call. This pass rewrites `quantize_wide_rows` of such an input into
`quantize_gelu_rows`, which reads the pre-activation (a column slice of the previous layer's output)
and the attention output directly and computes the GELU itself.

The blocks' inputs: each block layer-norms its input rows (no affine weights), modulates them
(`addcmul(shift, norm, 1 + scale)`) and quantizes them for the next FP8 layer. Inductor fuses that into one
kernel, 29 us for 4608 x 3072 on an H200; `quantize_modulated_layer_norm` takes 21. The pass hands it the rows
where the layer norm reads a graph input (a block's own input): where the norm follows a residual add,
inductor's kernel also writes the sum, and a separate kernel would read it back. It hands over the scale rather
than 1 + scale, which would otherwise be a kernel of its own (76 per step in FLUX.1-dev).
"""
import operator

import torch
from torch._inductor import inductor_prims
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true as known

from ..fx_match import concatenated_parts, is_call, value_of
from .. import triton_support
from . import quantize as fp8  # registers the fluxaccel:: custom ops below

aten = torch.ops.aten
QUANTIZE_WIDE_ROWS = torch.ops.fluxaccel.quantize_wide_rows.default
QUANTIZE_GELU_ROWS = torch.ops.fluxaccel.quantize_gelu_rows.default
QUANTIZE_MODULATED_LAYER_NORM = torch.ops.fluxaccel.quantize_modulated_layer_norm.default
prims = torch.ops.prims
CLAMPS = (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
# Inductor's fused multiply-add, which its decompositions may use.
FMA = inductor_prims.fma
# Ops that give the same elements in another shape: the quantized rows are a reshape of the GELU's output.
RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


# The names under which the pass counts its rewrites (the Compile FLUX line reports them).
GELU_SITES = "GELU into FP8 rows"
LAYER_NORM_SITES = "layer norm + modulation into FP8 rows"


class FuseIntoQuantization(CustomGraphPass):
    """Inductor's `post_grad_custom_post_pass`: rewrites every fusable quantization in a graph, adding
    the rewrites of each kind to `rewrites` (a Counter)."""

    def __init__(self, rewrites):
        self.rewrites = rewrites

    def __call__(self, graph: torch.fx.Graph) -> None:
        wide_rows = [node for node in graph.nodes if node.target == QUANTIZE_WIDE_ROWS]
        fp8_casts = [node for node in graph.nodes if is_fp8_cast(node)]
        gelus = sum(fuse_gelu(graph, node) for node in wide_rows)
        layer_norms = sum(fuse_modulated_layer_norm(graph, node) for node in fp8_casts)
        self.rewrites[GELU_SITES] += gelus
        self.rewrites[LAYER_NORM_SITES] += layer_norms
        if gelus or layer_norms:
            graph.eliminate_dead_code()

    def uuid(self):
        # Inductor caches compiled graphs under a key that includes this: a changed pass compiles anew.
        return get_hash_for_files((__file__,))


def fuse_gelu(graph, quantization):
    """Replaces `quantization` by `quantize_gelu_rows` where its rows are [prefix,] gelu(x); whether it did."""
    parts = concatenated_parts(without(quantization.args[0], RESHAPES), -1)
    pre_activation = tanh_gelu_input(parts[-1]) if 1 <= len(parts) <= 2 else None
    if pre_activation is None:
        return False
    with graph.inserting_before(quantization):
        prefix = as_rows(graph, parts[0]) if len(parts) == 2 else None
        fused = graph.call_function(QUANTIZE_GELU_ROWS, (prefix, as_rows(graph, pre_activation)))
    # The same outputs. Not the rest of the meta: `eager_input_vals` describes the replaced op's arguments.
    fused.meta["val"] = quantization.meta["val"]
    quantization.replace_all_uses_with(fused)
    graph.erase_node(quantization)
    return True




def tanh_gelu_input(node):
    """x, if `node` is the output of a tanh GELU(x), else None.

    Inductor has decomposed the GELU by the time the pass runs (casts, multiplications, a tanh), each
    node remembering the op it came from (`original_aten`). One tanh: not two GELUs in a row.
    """
    region, inputs, pending = set(), set(), [node]
    while pending:
        current = pending.pop()
        if current in region or current in inputs:
            continue
        if is_part_of_gelu(current):
            region.add(current)
            pending.extend(current.all_input_nodes)
        else:
            inputs.add(current)
    if len(inputs) != 1 or sum(part.target == aten.tanh.default for part in region) != 1:
        return None
    (pre_activation,) = inputs
    return pre_activation


def is_part_of_gelu(node):
    # By name: the graphs inductor hands over hold their own copies of the op objects.
    return node.op == "call_function" and str(node.meta.get("original_aten")) == str(aten.gelu.default)


def fuse_modulated_layer_norm(graph, fp8_cast):
    """Replaces the FP8 rows cast by `fp8_cast`, and their scales, by `quantize_modulated_layer_norm`'s where
    the rows are a modulated layer norm of a graph input; whether it did."""
    quantization = row_quantization(fp8_cast)
    block_input = modulated_layer_norm(without(quantization[0], RESHAPES)) if quantization else None
    if block_input is None or not kernel_takes(block_input[0], fp8_cast):
        return False
    x, mult, shift, eps = block_input
    scale_term = one_plus_term(mult, x)
    arguments = (x, mult, shift, eps) if scale_term is None else (x, scale_term, shift, eps, True)
    scale = quantization[1]
    # Before the scale: it precedes the cast, and the layer norm's inputs precede it.
    with graph.inserting_before(scale):
        fused = graph.call_function(QUANTIZE_MODULATED_LAYER_NORM, arguments)
        outputs = [graph.call_function(operator.getitem, (fused, index)) for index in (0, 1)]
    fused.meta["val"] = (fp8_cast.meta["val"], scale.meta["val"])
    for output, replaced in zip(outputs, (fp8_cast, scale)):
        output.meta["val"] = replaced.meta["val"]
        replaced.replace_all_uses_with(output)
    return True


def is_fp8_cast(node):
    return (is_call(node, prims.convert_element_type.default) and len(node.args) > 1
            and node.args[1] == fp8.FP8_DTYPE)


def row_quantization(fp8_cast):
    """(rows, scale node) if `fp8_cast` casts `quantize_rows(rows)`'s clamp(rows / scale), with the scale
    max(amax(|rows|, last dim) * c, floor); else None."""
    division = without(fp8_cast.args[0], CLAMPS)
    if not is_call(division, aten.div.Tensor):
        return None
    rows, scale = without(division.args[0], (prims.convert_element_type.default,)), division.args[1]
    product = without(scale, CLAMPS)
    if not is_call(product, aten.mul.Tensor):
        return None
    amaxes = [without(factor, (prims.convert_element_type.default,)) for factor in product.args]
    row_amax = next((node for node in amaxes if is_call(node, aten.amax.default)), None)
    if row_amax is None or not is_last_dim_reduction(row_amax) or not is_call(row_amax.args[0], aten.abs.default):
        return None
    return (rows, scale) if row_amax.args[0].args[0] is rows else None


def modulated_layer_norm(node):
    """(x, mult, shift, eps) if `node` is addcmul(shift, layer_norm(x, eps), mult) or shift + layer_norm(x) * mult
    (either factor order) with x [batch, tokens, features] a graph input; else None."""
    terms = modulation_terms(node)
    if terms is None:
        return None
    shift, *factors = terms
    for normalized, mult in (factors, factors[::-1]):
        norm = layer_norm_input(normalized)
        if (norm is not None and norm[0].op == "placeholder" and is_modulation_of(mult, norm[0])
                and is_modulation_of(shift, norm[0])):
            return norm[0], mult, shift, norm[1]
    return None


def modulation_terms(node):
    """[shift, factor, factor] of addcmul(shift, factor, factor), also as inductor may decompose it: upcasts
    around shift + factor * factor (a product maybe also by a literal 1), or fma(factor, factor, shift)."""
    if is_call(node, aten.addcmul.default):
        return list(node.args[:3]) if node.kwargs.get("value", 1) == 1 and len(node.args) == 3 else None
    total = without(node, (prims.convert_element_type.default,))
    if is_call(total, FMA) and len(total.args) == 3:
        candidates = [(total.args[2], product_factors(total.args[0]) + product_factors(total.args[1]))]
    elif is_call(total, aten.add.Tensor) and len(total.args) == 2:
        candidates = [(shift, product_factors(product)) for shift, product in (total.args, total.args[::-1])]
    else:
        return None
    for shift, factors in candidates:
        if isinstance(shift, torch.fx.Node) and len(factors) == 2 and None not in factors:
            return [without_upcast(shift), *factors]
    return None


def product_factors(node):
    """The tensors multiplied into `node` (nested multiplications, upcasts and literal 1s looked through, but not
    a layer norm's own product); [None] where a factor is another number."""
    node = without_upcast(node)
    if not is_call(node, aten.mul.Tensor) or layer_norm_input(node) is not None:
        return [node] if isinstance(node, torch.fx.Node) else ([] if node == 1 else [None])
    return [factor for argument in node.args for factor in product_factors(argument)]


def without_upcast(node):
    """`node` without a cast to float32 on top (the decomposition's upcast of an operand)."""
    upcast = is_call(node, prims.convert_element_type.default) and node.args[1] == torch.float32
    return node.args[0] if upcast else node


def layer_norm_input(node):
    """(x, eps) if `node` is inductor's decomposition of layer_norm(x, eps) over the last dimension without
    affine weights, rounded to x's dtype or not: inductor (torch 2.11) drops that rounding where an upcast
    follows, as addcmul's decomposition does. Else None."""
    rounded = is_call(node, prims.convert_element_type.default)
    product = node.args[0] if rounded else node
    if not is_call(product, aten.mul.Tensor) or len(product.args) != 2:
        return None
    for centered, inverse_std in (product.args, product.args[::-1]):
        if is_call(centered, aten.sub.Tensor) and is_call(inverse_std, aten.rsqrt.default):
            return layer_norm_statistics(centered, inverse_std.args[0], node.args[1] if rounded else None)
    return None


def layer_norm_statistics(centered, variance_plus_eps, dtype):
    """(x, eps) where centered = float(x) - mean and variance_plus_eps = variance + eps, both from one
    var_mean(float(x)) over x's last dimension, and `dtype` (where the norm is rounded) is x's; else None."""
    upcast, mean = centered.args
    if not (is_call(variance_plus_eps, aten.add.Tensor) and isinstance(variance_plus_eps.args[1], float)):
        return None
    variance = variance_plus_eps.args[0]
    statistics = {getitem_source(variance), getitem_source(mean)}
    if len(statistics) != 1 or getitem_index(variance) != 0 or getitem_index(mean) != 1:
        return None
    (var_mean,) = statistics
    if not (is_call(var_mean, aten.var_mean.correction) and var_mean.args[0] is upcast
            and var_mean.kwargs.get("correction") == 0 and var_mean.kwargs.get("keepdim")
            and is_last_dim_reduction(var_mean) and is_call(upcast, prims.convert_element_type.default)):
        return None
    x = upcast.args[0]
    return (x, variance_plus_eps.args[1]) if dtype in (None, value_of(x).dtype) and value_of(x).dim() == 3 else None


def is_modulation_of(modulation, x):
    """Whether `modulation` is a [batch or 1, 1, features] tensor for x [batch, tokens, features]."""
    value, rows = value_of(modulation), value_of(x)
    return (value is not None and value.dim() == 3 and value.dtype == rows.dtype
            and known(value.shape[1] == 1) and known(value.shape[2] == rows.shape[2])
            and (known(value.shape[0] == 1) or known(value.shape[0] == rows.shape[0])))


def one_plus_term(mult, x):
    """s where `mult` is 1 + s computed in x's dtype (FLUX's 1 + scale) with s a modulation of x; else None."""
    if not is_call(mult, aten.add.Tensor, aten.add.Scalar) or mult.kwargs or len(mult.args) != 2:
        return None
    for term, one in (mult.args, mult.args[::-1]):
        if isinstance(term, torch.fx.Node) and not isinstance(one, torch.fx.Node) and one == 1 \
                and is_modulation_of(term, x):
            return term
    return None


def kernel_takes(x, fp8_cast):
    """Whether the kernel runs where x lies (a GPU, or Triton's interpreter), on rows it holds, with 2-D outputs."""
    features = value_of(x).shape[2]
    return (triton_support.triton_kernels_take(value_of(x)) or triton_support.TRITON_INTERPRETS) and isinstance(features, int) \
        and features <= fp8.MODULATED_LAYER_NORM_MAX_FEATURES and value_of(fp8_cast).dim() == 2


def is_last_dim_reduction(node):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    last = value_of(node.args[0]).dim() - 1
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, last)


def getitem_source(node):
    return node.args[0] if is_call(node, operator.getitem) else None


def getitem_index(node):
    return node.args[1] if is_call(node, operator.getitem) else None


def without(node, targets):
    """`node` with the ops in `targets` (each on its first argument) peeled off."""
    while is_call(node, *targets):
        node = node.args[0]
    return node






def as_rows(graph, node):
    """A node giving `node`'s value reshaped to [rows, features], as the fused op takes it."""
    features = node.meta["val"].shape[-1]
    rows = graph.call_function(aten.reshape.default, (node, [-1, features]))
    rows.meta["val"] = node.meta["val"].reshape(-1, features)
    return rows


def inductor_options(rewrites):
    """Inductor config patches that install the pass (compile_fx's `config_patches`), counting into `rewrites`."""
    return {"post_grad_custom_post_pass": FuseIntoQuantization(rewrites)}

