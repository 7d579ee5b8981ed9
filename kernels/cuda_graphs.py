"""Replaying a whole model call from one CUDA graph.

Compiled FP8 FLUX.1-dev issues about 1,300 kernels per step. Launched one by one they keep the GPU
busy only while the host stays ahead; a host slowed by anything else running (or by Python in the
call) leaves it idle. A CUDA graph launches the call's kernels at once: on an H200 whose host was
disturbed, 28 steps took 2.69 s launched one by one and 2.415 s replayed, the same latent bit for
bit (docs/BENCHMARKS.md).

A graph replays the GPU work of the call it captured: host code in the call ran once, at capture.
So a call is replayed only when what its host code decides from is the same as at capture: the
arguments' structure, shapes, dtypes and devices, their non-tensor values, and `state` (the caller
passes what else the call reads, such as `weights_signature` of its module). Tensor arguments are
copied into the graph's own input buffers before each replay. Whether the call has host logic
beyond that (patches deciding per step) is the caller's to rule out.
"""
import contextlib
import itertools
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Graphs kept per `CapturedCalls`: each distinct input shape (resolution, batch) or weight set
# captures its own. They share one memory pool, so more graphs cost little more memory.
MAX_GRAPHS = 8
# Signatures seen once (awaiting their second call) or found uncapturable; forgotten past this many
# (signatures that never repeat, such as a weight set reloaded for every run, must not accumulate).
MAX_SIGNATURES_KEPT = 64


def weights_signature(module):
    """What a call may read from `module`'s parameters and buffers other than their values: each
    tensor's address, shape, strides and dtype, and a tensor subclass's metadata (an FP8 weight's
    layout options) with the same of the tensors inside it. A weight replaced or moved changes it.
    (Computed at every call: a few ms for FLUX.1-dev, while the GPU runs the previous step.)"""
    return tuple(tensor_identity(tensor) for child in module.modules()
                 for tensor in itertools.chain(child._parameters.values(), child._buffers.values()) if tensor is not None)


def tensor_identity(tensor):
    if is_traceable_wrapper_subclass(tensor):
        inner_names, metadata = tensor.__tensor_flatten__()
        return type(tensor), frozen(metadata), tuple(tensor_identity(getattr(tensor, name)) for name in inner_names)
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def frozen(value):
    """`value` with its dicts and lists made tuples, to be hashed."""
    if isinstance(value, dict):
        return tuple((key, frozen(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(frozen(item) for item in value)
    return value


@contextlib.contextmanager
def host_syncs_watched():
    """Yields a list that, after the block, holds the messages of the CUDA operations in it that
    made the host wait for the GPU (torch's sync debug mode); other warnings pass on."""
    syncs, previous_mode = [], torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)
    for warning in caught:
        if "synchronizing CUDA operation" in str(warning.message):
            syncs.append(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def reset_cuda_random_state():
    """A capture that fails part-way leaves the device's default random generator in capture mode:
    every later random operation on the device then fails ("Offset increment outside graph capture
    encountered unexpectedly"). The generator gets a fresh state with the same seed and offset."""
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    fresh = torch.Generator(device=torch.device("cuda", torch.cuda.current_device()))
    fresh.manual_seed(generator.initial_seed())
    fresh.set_offset(generator.get_offset())
    generator.graphsafe_set_state(fresh)


def call_signature(args, kwargs, state):
    """What a captured call's host code may have decided from: the arguments' structure, each
    tensor's shape, dtype and device, the other values, and `state`. Unhashable values make it None
    (such a call is never captured)."""
    leaves, structure = pytree.tree_flatten((args, kwargs))
    described = tuple((tuple(leaf.shape), leaf.dtype, leaf.device) if torch.is_tensor(leaf) else leaf for leaf in leaves)
    signature = (structure, described, state)
    try:
        hash(signature)
    except TypeError:
        return None
    return signature


def remember(signatures, signature):
    if len(signatures) >= MAX_SIGNATURES_KEPT:
        signatures.clear()
    signatures.add(signature)


@dataclass
class CapturedCall:
    graph: "torch.cuda.CUDAGraph"
    inputs: list  # the graph's input buffers, in the order of the arguments' tensor leaves
    output: object

    def replay(self, args, kwargs):
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(leaf)]
        for buffer, tensor in zip(self.inputs, tensors):
            buffer.copy_(tensor)
        self.graph.replay()
        # The next replay overwrites the graph's output buffers; the caller gets its own copy.
        return pytree.tree_map(lambda leaf: leaf.clone() if torch.is_tensor(leaf) else leaf, self.output)


@dataclass
class CallCounts:
    replayed: int = 0
    captured: int = 0
    eager: int = 0


class CapturedCalls:
    """Runs `function(*args, **kwargs)` on a CUDA device, replaying it from a CUDA graph when a call
    with the same signature was seen before: the first call with a signature runs as is (it compiles
    what needs compiling, and warms cuBLAS and cuDNN), the second runs as is and is then captured,
    later ones replay. A call that syncs with the host, or whose capture fails, is logged and its
    signature runs as is from then on."""

    def __init__(self, name):
        self.name = name
        self.graphs = OrderedDict()
        self.seen = set()
        self.uncapturable = set()
        self.pool = None
        self.counts = CallCounts()

    def __call__(self, function, args, kwargs, state):
        signature = call_signature(args, kwargs, state)
        if signature in self.graphs:
            self.graphs.move_to_end(signature)
            self.counts.replayed += 1
            return self.graphs[signature].replay(args, kwargs)
        if signature is None or signature in self.uncapturable or signature not in self.seen:
            if signature is not None:
                remember(self.seen, signature)
            self.counts.eager += 1
            return function(*args, **kwargs)
        return self.run_and_capture(signature, function, args, kwargs)

    def run_and_capture(self, signature, function, args, kwargs):
        # The call runs as is (its result is this call's), watched for host syncs, which a capture
        # cannot hold; then the capture records the same work without running it. The first call with
        # this signature already did the lazy set-up (CUDA's recipe warms up before capturing).
        with host_syncs_watched() as syncs:
            result = function(*args, **kwargs)
        self.counts.eager += 1
        if syncs:
            self.refuse(signature, f"it waits for the GPU on the host: {syncs[0]}")
            return result
        try:
            self.graphs[signature] = self.capture(function, args, kwargs)
        except Exception as error:  # an operation a capture cannot hold
            self.refuse(signature, error)
            return result
        self.counts.captured += 1
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return result

    def refuse(self, signature, reason):
        remember(self.uncapturable, signature)
        logging.warning("%s: this call cannot be captured in a CUDA graph (%s); it runs without one.", self.name, reason)

    def capture(self, function, args, kwargs):
        static_args, static_kwargs = pytree.tree_map(
            lambda leaf: leaf.clone() if torch.is_tensor(leaf) else leaf, (args, kwargs))
        # The eager run's memory goes back to the driver before the graph takes its own pool.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                output = function(*static_args, **static_kwargs)
        except Exception:
            reset_cuda_random_state()
            raise
        self.pool = graph.pool()
        inputs = [leaf for leaf in pytree.tree_leaves((static_args, static_kwargs)) if torch.is_tensor(leaf)]
        return CapturedCall(graph, inputs, output)

    def release(self):
        """Drops every graph and the memory they hold (the model was unloaded)."""
        self.graphs.clear()
        self.seen.clear()
        self.uncapturable.clear()
        self.pool = None
