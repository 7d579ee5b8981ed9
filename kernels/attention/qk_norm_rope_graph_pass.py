"""A rewrite of Dynamo's graph of a FLUX block: its attention inputs come from `qk_norm_rope` in one pass.

FLUX's blocks (ComfyUI's `comfy/ldm/flux/layers.py`) build attention's inputs as

    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)      # per token segment
    q, k = rms_norm(q, (d,), w_q, eps).to(v), rms_norm(k, (d,), w_k, eps).to(v)
    q, k, v = cat((txt_q, img_q), 2), ...                              # double blocks only
    q, k = apply_rope(q, k, pe)                                        # comfy_kitchen's op

The rewrite finds each `apply_rope` whose inputs were built that way and gives it, and the values that
attention reads, `qk_norm_rope`'s outputs instead; anything else is left as it is. It runs on the graph
Dynamo hands the compile backend (torch-level calls), before inductor sees it; the replaced ops are left
without users, and the tracing that follows drops them.
"""
import operator

import torch

from ..fx_match import concatenated_parts, is_call, value_of
from . import qk_norm_rope  # noqa: F401 - registers fluxaccel::qk_norm_rope

# The name under which the rewrite's sites are counted (the Compile FLUX line reports them).
QK_NORM_ROPE_SITES = "q/k norm + RoPE"
QK_NORM_ROPE = torch.ops.fluxaccel.qk_norm_rope.default
ROPE_OP_NAME = "comfy_kitchen.apply_rope"
RMS_NORMS = (torch.rms_norm, torch.nn.functional.rms_norm)
RMS_NORM_ARGUMENTS = ("input", "normalized_shape", "weight", "eps")
HEADS_FIRST = (2, 0, 3, 1, 4)
QUERY, KEY, VALUE = range(3)
TOKENS_DIM = 2


def fuse_qk_norm_rope(graph_module: torch.fx.GraphModule) -> int:
    """Rewrites every matching `apply_rope` in the graph; the number rewritten."""
    ropes = [node for node in graph_module.graph.nodes if is_rope(node)]
    fused = sum(fuse_rope(graph_module.graph, rope) for rope in ropes)
    if fused:
        graph_module.recompile()
    return fused


def is_rope(node):
    # By name: comfy_kitchen is ComfyUI's dependency, not this module's.
    return node.op == "call_function" and str(node.target).removesuffix(".default") == ROPE_OP_NAME


def fuse_rope(graph, rope):
    """Replaces `rope`'s outputs, and the values attention reads beside them, by `qk_norm_rope`'s."""
    if len(rope.args) != 3 or len(rope_outputs(rope)) != len(rope.users):
        return False
    queries, keys, freqs_cis = rope.args
    query_norms, key_norms = segment_norms(queries), segment_norms(keys)
    segments = [segment_of(q, k) for q, k in zip(query_norms, key_norms)]
    if not segments or len(query_norms) != len(key_norms) or None in segments:
        return False
    eps = {rms_norm_arguments(norm).get("eps") for norm in query_norms + key_norms}
    values = value_nodes([segment.heads for segment in segments])
    if len(eps) != 1 or not values:
        return False
    with graph.inserting_before(rope):
        fused = graph.call_function(QK_NORM_ROPE, ([s.qkv for s in segments], [s.query_weight for s in segments],
                                                   [s.key_weight for s in segments], eps.pop(), freqs_cis))
        heads_first = [graph.call_method("transpose", (graph.call_function(operator.getitem, (fused, part)), 1, 2))
                       for part in (QUERY, KEY, VALUE)]
    set_example_values(fused, heads_first)
    for index, output in rope_outputs(rope).items():
        output.replace_all_uses_with(heads_first[index])
    # Users before the rope (FLUX's `q.to(v)`, which reads only v's dtype) keep the old node: the new one
    # comes later in the graph.
    later = nodes_after(rope)
    for value in values:
        value.replace_all_uses_with(heads_first[VALUE], delete_user_cb=lambda user: user in later)
    return True


def nodes_after(node):
    later, current = set(), node.next
    while current.op != "root":
        later.add(current)
        current = current.next
    return later


class Segment:
    """One token segment's qkv projection and its query and key norm weights."""

    def __init__(self, qkv, heads, query_weight, key_weight):
        self.qkv, self.heads, self.query_weight, self.key_weight = qkv, heads, query_weight, key_weight


def segment_norms(node):
    """The rms_norm nodes whose outputs, concatenated along the tokens (or alone), are `node`; [] if not so."""
    parts = concatenated_parts(node, TOKENS_DIM)
    norms = [rms_norm_of(without_same_dtype_cast(part)) for part in parts]
    return [] if None in norms else norms




def without_same_dtype_cast(node):
    """x for `x.to(...)` that keeps x's dtype (FLUX's `q.to(v)`), else `node`."""
    if node is not None and node.op == "call_method" and node.target == "to":
        source = node.args[0]
        if value_of(source).dtype == value_of(node).dtype:
            return source
    return node


def rms_norm_of(node):
    """`node` if it is rms_norm(x, (d,), weight) over a head's last dimension, with a weight; else None."""
    if node is None or not any(is_call(node, norm) for norm in RMS_NORMS):
        return None
    arguments = rms_norm_arguments(node)
    head_dim = value_of(arguments["input"]).shape[-1]
    if arguments.get("weight") is None or list(arguments["normalized_shape"]) != [head_dim]:
        return None
    return node


def rms_norm_arguments(norm):
    return normalized_arguments(norm, RMS_NORM_ARGUMENTS)


def segment_of(query_norm, key_norm):
    """The segment whose query and key `query_norm` and `key_norm` normalize, or None."""
    query_parts = split_part(rms_norm_arguments(query_norm)["input"])
    key_parts = split_part(rms_norm_arguments(key_norm)["input"])
    if query_parts is None or key_parts is None or (query_parts[0], query_parts[1], key_parts[1]) != (
            key_parts[0], QUERY, KEY):
        return None
    heads, qkv = query_parts[0], query_parts[2]
    weights = [rms_norm_arguments(norm)["weight"] for norm in (query_norm, key_norm)]
    return Segment(qkv, heads, *weights)


def split_part(node):
    """(heads node, part, qkv) for `qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)[part]`, else None."""
    if not is_call(node, operator.getitem) or not isinstance(node.args[1], int):
        return None
    heads = node.args[0]
    if heads.op != "call_method" or heads.target != "permute" or tuple(permute_dims(heads)) != HEADS_FIRST:
        return None
    view = heads.args[0]
    if view.op != "call_method" or view.target not in ("view", "reshape"):
        return None
    qkv = view.args[0]
    shape, view_shape = value_of(qkv).shape, value_of(view).shape
    if len(shape) != 3 or len(view_shape) != 5 or tuple(view_shape[:3]) != (shape[0], shape[1], 3):
        return None
    return heads, node.args[1], qkv


def permute_dims(node):
    dims = node.args[1:]
    return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)


def value_nodes(heads_nodes):
    """The nodes attention may read the values from: each segment's `[2]` parts (one segment), or their
    concatenations along the tokens in the segments' order (several); [] if the graph has none."""
    parts = [[user for user in heads.users if is_call(user, operator.getitem) and user.args[1] == VALUE]
             for heads in heads_nodes]
    if len(parts) == 1:
        return parts[0]
    concatenations = {user for part in parts[0] for user in part.users if is_call(user, torch.cat)}
    return [node for node in concatenations if matches_segments(concatenated_parts(node, TOKENS_DIM), parts)]


def matches_segments(concatenated, parts):
    return len(concatenated) == len(parts) and all(node in options for node, options in zip(concatenated, parts))


def rope_outputs(rope):
    """{0: the rotated queries' node, 1: the keys'}, from the `getitem`s that read the op's outputs."""
    return {user.args[1]: user for user in rope.users if is_call(user, operator.getitem) and user.args[1] in (0, 1)}




def normalized_arguments(node, names):
    """A call node's arguments by name, positional or keyword."""
    arguments = dict(zip(names, node.args))
    arguments.update({name: value for name, value in node.kwargs.items() if name in names})
    return arguments




def set_example_values(fused, heads_first):
    """The fake tensors Dynamo keeps on every node, for the new ones (inductor's graph passes read them)."""
    arguments = torch.fx.node.map_arg(fused.args, value_of)
    with arguments[0][0].fake_mode:
        outputs = QK_NORM_ROPE(*arguments)
    fused.meta["example_value"] = outputs
    for part, transposed in zip(outputs, heads_first):
        transposed.args[0].meta["example_value"] = part
        transposed.meta["example_value"] = part.transpose(1, 2)
