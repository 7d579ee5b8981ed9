"""What the pack's FX graph passes ask of a node: which call it is, the value it carries, what it concatenates.

The passes read two kinds of graph: Dynamo's (torch-level calls, fake tensors in `example_value`), before
inductor sees it, and inductor's post-grad graphs (aten ops, fake tensors in `val`).
"""
import torch

CONCATENATIONS = (torch.cat, torch.ops.aten.cat.default)


def is_call(node, *targets):
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def value_of(node):
    """The fake tensor a node of either kind of graph carries; None for what is not a node."""
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta["val"] if "val" in node.meta else node.meta.get("example_value")


def concatenated_parts(node, dim):
    """The tensors concatenated along `dim` into `node`: [node] if it is no concatenation, [] if it is one
    along another dimension."""
    if not is_call(node, *CONCATENATIONS):
        return [node]
    tensors = node.args[0]
    along = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = value_of(node).dim()
    return list(tensors) if along % rank == dim % rank else []
