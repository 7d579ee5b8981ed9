"""An inductor graph pass: the MLPs' GELU goes into the FP8 quantization of the layer that reads it.

FLUX's second MLP layers read `gelu(h)` (double blocks) or `cat(attention, gelu(h))` (single blocks),
rows 12288 and 15360 wide. Their FP8 activations come from `quantize_wide_rows`, a custom op, so
inductor first writes the GELU and the concatenation out in bf16 and the op reads them back: on an
H200, 112 + 80 us per single-block call. This pass rewrites `quantize_wide_rows` of such an input into
`quantize_gelu_rows`, which reads the pre-activation (a column slice of the previous layer's output)
and the attention output directly and computes the GELU itself.
"""
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import fp8  # registers the fluxaccel:: custom ops below
from . import inductor_heuristics

aten = torch.ops.aten
QUANTIZE_WIDE_ROWS = torch.ops.fluxaccel.quantize_wide_rows.default
QUANTIZE_GELU_ROWS = torch.ops.fluxaccel.quantize_gelu_rows.default
# Ops that give the same elements in another shape: the quantized rows are a reshape of the GELU's output.
RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


class FuseGeluIntoQuantization(CustomGraphPass):
    """Inductor's `post_grad_custom_post_pass`: rewrites every fusable `quantize_wide_rows` in a graph."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        quantizations = [node for node in graph.nodes if node.target == QUANTIZE_WIDE_ROWS]
        if sum(fuse_gelu(graph, node) for node in quantizations):
            graph.eliminate_dead_code()

    def uuid(self):
        # Inductor caches compiled graphs under a key that includes this (and not the heuristics Compile FLUX's
        # backend compiles under): a changed pass or changed heuristics compile anew.
        return get_hash_for_files((__file__, inductor_heuristics.__file__))


def fuse_gelu(graph, quantization):
    """Replaces `quantization` by `quantize_gelu_rows` where its rows are [prefix,] gelu(x); whether it did."""
    parts = concatenated_parts(without_reshapes(quantization.args[0]))
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


def without_reshapes(node):
    while node.op == "call_function" and node.target in RESHAPES:
        node = node.args[0]
    return node


def concatenated_parts(node):
    """The tensors concatenated along the last dimension into `node`, or [node] if it is no concatenation."""
    if node.op != "call_function" or node.target != aten.cat.default:
        return [node]
    tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    last_dim = node.meta["val"].dim() - 1
    return list(tensors) if dim in (-1, last_dim) else []


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


def as_rows(graph, node):
    """A node giving `node`'s value reshaped to [rows, features], as the fused op takes it."""
    features = node.meta["val"].shape[-1]
    rows = graph.call_function(aten.reshape.default, (node, [-1, features]))
    rows.meta["val"] = node.meta["val"].reshape(-1, features)
    return rows


def inductor_options():
    """Inductor config patches that install the pass (compile_fx's `config_patches`)."""
    return {"post_grad_custom_post_pass": FuseGeluIntoQuantization()}

