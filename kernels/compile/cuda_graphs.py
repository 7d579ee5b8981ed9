"""Replaying model calls from CUDA graphs, split into segments where the call's host code decides.

Compiled FP8 FLUX.1-dev issues about 1,300 kernels per step. Launched one by one they keep the GPU
busy only while the host stays ahead; a host slowed by anything else running (or by Python in the
call) leaves it idle. A CUDA graph launches the call's kernels at once: on an H200 whose host was
disturbed, 28 steps took 2.69 s launched one by one and 2.415 s replayed, the same latent bit for
bit (docs/LAB-NOTEBOOK.md).

A graph replays the GPU work of the call it captured: host code in the call ran once, at capture.
So a call is replayed only when what its host code decides from is the same as at capture: the
arguments' structure, shapes, dtypes and devices, their non-tensor values, and `state` (the caller
passes what else the call reads, such as `weights_signature` of its module). Tensor arguments are
copied into the graph's own input buffers before each replay.

Host code that must decide at every call from values the GPU computed (First Block Cache: reuse the
cached residual or run the remaining blocks) does not stop the replay; it splits the call. While
the call is captured, such code finds a `Recording` in the call and marks where it decides: the
stage recorded so far ends there (`Recording.branch`), the code that follows is recorded as one
alternative of the next stage, and where the alternatives meet again (`Recording.join`) the others
are recorded from functions the host code hands over. A replay then runs each stage's graph, asking
the host code's `choose(context)` which alternative a branched stage takes: one read of the GPU per
decision, everything between decisions replayed. Values that cross from one segment to the next
live in tensors the graphs hold, so their addresses are the same at every replay. Values that cross
from one call to a later one (cached residuals) live in tensors kept outside the graphs' memory pool
(`Recording.kept_tensor`): the pool's memory holds nothing from one call to the next, since every graph
sharing it (this call's earlier segments included) may reuse memory freed before it was captured.

The recording and replay themselves are a recorder's: `CudaGraphRecorder` on GPUs; the tests run the
same code on the CPU with a stand-in that records the ATen operations instead.
"""
import contextlib
import itertools
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Captured calls kept: each distinct input shape (resolution, batch) or weight set captures its own.
# Their graphs share one memory pool, so more of them cost little more memory.
MAX_GRAPHS = 8
# Signatures seen once (awaiting their second call) or found uncapturable; forgotten past this many
# (signatures that never repeat, such as a weight set reloaded for every run, must not accumulate).
MAX_SIGNATURES_KEPT = 64
# The name of a stage's only graph (a stage no decision precedes).
ONLY = ""


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


def tensor_leaves(structure):
    return [leaf for leaf in pytree.tree_leaves(structure) if torch.is_tensor(leaf)]


def cloned_tensors(structure):
    return pytree.tree_map(lambda leaf: leaf.clone() if torch.is_tensor(leaf) else leaf, structure)


class HostSyncWatch:
    """Within `with`, collects the messages of the CUDA operations that made the host wait for the GPU
    (torch's sync debug mode), except inside `host_decision()`; other warnings pass on. The run of a
    call before its capture is watched: a capture cannot hold a wait, except where the call splits."""

    def __init__(self):
        self.syncs = []

    def __enter__(self):
        self._previous_mode = torch.cuda.get_sync_debug_mode()
        self._catching = warnings.catch_warnings(record=True)
        self._caught = self._catching.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exception):
        torch.cuda.set_sync_debug_mode(self._previous_mode)
        self._catching.__exit__(*exception)
        for warning in self._caught:
            if "synchronizing CUDA operation" in str(warning.message):
                self.syncs.append(str(warning.message))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    @contextlib.contextmanager
    def host_decision(self):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(mode)


def reset_cuda_random_state():
    """A capture that fails part-way leaves the device's default random generator in capture mode:
    every later random operation on the device then fails ("Offset increment outside graph capture
    encountered unexpectedly"). The generator gets a fresh state with the same seed and offset."""
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    fresh = torch.Generator(device=torch.device("cuda", torch.cuda.current_device()))
    fresh.manual_seed(generator.initial_seed())
    fresh.set_offset(generator.get_offset())
    generator.graphsafe_set_state(fresh)


@dataclass
class CudaCapture:
    context: "torch.cuda.graph"
    stream_before: "torch.cuda.Stream"


class CudaGraphRecorder:
    """Records GPU work into CUDA graphs that share one memory pool, and replays them.

    A recording may begin in one function and end in another (a call's segments end inside its
    hooks), so the capture context is entered and left by hand."""

    def __init__(self):
        self.pool = None

    @staticmethod
    def records_on(device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def watch_host_syncs() -> HostSyncWatch:
        return HostSyncWatch()

    def begin(self):
        capture = CudaCapture(torch.cuda.graph(torch.cuda.CUDAGraph(), pool=self.pool), torch.cuda.current_stream())
        capture.context.__enter__()
        return capture

    def end(self, capture):
        capture.context.__exit__(None, None, None)
        self.pool = capture.context.cuda_graph.pool()
        return capture.context.cuda_graph

    @staticmethod
    def abandon(capture):
        """Ends a capture that failed part-way: no graph, the caller's stream and random numbers back."""
        try:
            capture.context.__exit__(None, None, None)
        except Exception:  # an invalidated capture cannot end cleanly; what matters is set back below
            pass
        torch.cuda.set_stream(capture.stream_before)
        reset_cuda_random_state()

    @staticmethod
    def replay_call(graphs):
        """Replays one call's graphs in order, as `graphs` yields them (host decisions in between)."""
        for graph in graphs:
            graph.replay()

    def release(self):
        self.pool = None


@dataclass
class Stage:
    """One step of a captured call's replay: its only graph, or the alternatives a decision picks from."""
    graphs: dict = field(default_factory=dict)  # alternative's name -> graph (ONLY: no decision)
    choose: Optional[Callable[[object], str]] = None  # the replayed call's context -> alternative


class Recording:
    """The capture of one call, segment by segment, while the call's code runs (see the module's
    description). Host code that decides per call finds it in the call and splits the recording:

        recording.branch(choose, "compute", decider="First Block Cache")   # ... the compute path runs
        recording.join({"reuse": record_reuse})                            # ... the rest of the call
    """

    def __init__(self, recorder, kept: dict):
        self.recorder = recorder
        self.stages: list[Stage] = []
        self.prepare: list[Callable[[object], None]] = []
        self.deciders: list[str] = []
        # Tensors that live across calls, allocated outside the graphs' pool before the capture; the
        # ones the call asked for but were not there, to allocate for the capture done again.
        self.kept = kept
        self.missing: dict[str, tuple] = {}
        self.output = None
        self._stage = Stage()
        self._alternative = ONLY
        self._capture = None

    def start(self):
        self._capture = self.recorder.begin()

    def kept_tensor(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A tensor whose values a later call reads (a cached residual), zeros at first: kept outside the
        graphs' memory pool, whose memory any graph may reuse. The first capture of a call only learns
        the tensors it needs (it gets pool stand-ins) and is then done again with them."""
        layout = (tuple(shape), dtype, torch.device(device))
        tensor = self.kept.get(name)
        if tensor is not None and (tuple(tensor.shape), tensor.dtype, tensor.device) == layout:
            return tensor
        self.missing[name] = layout
        return torch.empty(layout[0], dtype=dtype, device=device)

    def on_replay(self, prepare: Callable[[object], None]):
        """Host code that runs before each replay of the call, given its context (copying values
        that earlier calls left outside the graphs' tensors into them)."""
        self.prepare.append(prepare)

    def branch(self, choose: Callable[[object], str], recorded_alternative: str, decider: str):
        """Ends the stage recorded so far: at replay, `choose(context)` names the alternative that
        runs next. The call's code that follows is recorded as `recorded_alternative`."""
        if self._stage.choose is not None:
            raise RuntimeError("a recorded call branched again before its alternatives joined")
        self._end_segment()
        self.stages.append(self._stage)
        self._stage, self._alternative = Stage(choose=choose), recorded_alternative
        self.deciders.append(decider)
        self._capture = self.recorder.begin()

    def join(self, other_alternatives: dict[str, Callable[[], None]]):
        """Ends the alternative being recorded; records each other one by calling its function (which
        leaves its results where the recorded alternative left its own); the call's code that follows
        is recorded as the next stage."""
        self._end_segment()
        for name, record in other_alternatives.items():
            self._alternative, self._capture = name, self.recorder.begin()
            record()
            self._end_segment()
        self.stages.append(self._stage)
        self._stage, self._alternative = Stage(), ONLY
        self._capture = self.recorder.begin()

    def finish(self):
        if self._stage.choose is not None:
            raise RuntimeError("a recorded call branched and its alternatives never joined")
        self._end_segment()
        self.stages.append(self._stage)

    def abandon(self):
        if self._capture is not None:
            self.recorder.abandon(self._capture)
            self._capture = None

    def _end_segment(self):
        self._stage.graphs[self._alternative] = self.recorder.end(self._capture)
        self._capture = None


def host_decision(graph_pass):
    """Context for host code that reads the GPU to decide how a call goes on: allowed in the run
    watched before a capture (`graph_pass` a HostSyncWatch, or a stand-in's), where the recording
    will split; nothing to do otherwise."""
    decision = getattr(graph_pass, "host_decision", None)
    return decision() if decision is not None else contextlib.nullcontext()


@dataclass
class CapturedCall:
    inputs: list  # the graphs' input buffers, in the order of the arguments' tensor leaves
    output: object
    stages: list
    prepare: list
    deciders: tuple

    @property
    def segments(self) -> int:
        """Graphs one replay runs."""
        return len(self.stages)

    def replay(self, recorder, args, kwargs, context):
        for buffer, tensor in zip(self.inputs, tensor_leaves((args, kwargs))):
            buffer.copy_(tensor)
        for prepare in self.prepare:
            prepare(context)
        recorder.replay_call(stage.graphs[stage.choose(context) if stage.choose is not None else ONLY]
                             for stage in self.stages)
        # The next replay overwrites the graphs' output buffers; the caller gets its own copy.
        return cloned_tensors(self.output)


@dataclass
class CallCounts:
    """What one sampling run's model calls did; segments count graphs run or captured."""
    replayed: int = 0
    captured: int = 0
    eager: int = 0
    segments_replayed: int = 0
    segments_captured: int = 0
    deciders: set = field(default_factory=set)


LAUNCH, CAPTURE, REPLAY = "launch", "capture", "replay"


@dataclass(frozen=True)
class GraphOrder:
    """What to do with one call: launch it, run and capture it as captured call `number`, or replay
    that one; `released` numbers the captured calls to drop first. Every rank sharing a call gets the
    same order, so their graphs (and the collectives inside) stay in lockstep."""
    action: str
    number: Optional[int] = None
    released: tuple = ()


def remember(signatures, signature):
    if len(signatures) >= MAX_SIGNATURES_KEPT:
        signatures.clear()
    signatures.add(signature)


class CapturePlanner:
    """Decides, from calls' signatures, which call is launched, captured or replayed: the first call
    with a signature runs as is (it compiles what needs compiling and warms cuBLAS and cuDNN), the
    second runs as is and is then captured, later ones replay. A signature whose capture failed runs
    as is from then on."""

    def __init__(self, name):
        self.name = name
        self.numbers = OrderedDict()  # signature -> captured call number, least recently used first
        self.seen = set()
        self.uncapturable = set()
        self._next_number = itertools.count()

    def order(self, signature) -> GraphOrder:
        if signature in self.numbers:
            self.numbers.move_to_end(signature)
            return GraphOrder(REPLAY, self.numbers[signature])
        if signature is None or signature in self.uncapturable or signature not in self.seen:
            if signature is not None:
                remember(self.seen, signature)
            return GraphOrder(LAUNCH)
        released = []
        while len(self.numbers) >= MAX_GRAPHS:
            released.append(self.numbers.popitem(last=False)[1])
        return GraphOrder(CAPTURE, next(self._next_number), tuple(released))

    def settle(self, signature, order: GraphOrder, failure: Optional[str]):
        """Takes note of how the order went: a captured call replays from now on, a failed one never."""
        if order.action != CAPTURE:
            return
        if failure is None:
            self.numbers[signature] = order.number
            return
        remember(self.uncapturable, signature)
        logging.warning("%s: this call cannot be captured in a CUDA graph (%s); it runs without one.", self.name, failure)

    def release(self):
        self.numbers.clear()
        self.seen.clear()
        self.uncapturable.clear()


def alone(ok: bool) -> bool:
    """`agree` for a call that only this process runs."""
    return ok


class CapturedCalls:
    """One process's captured calls, run as `GraphOrder`s say.

    `function(graph_pass, *args, **kwargs)` runs the call; `graph_pass` is None when it is launched,
    the recorder's HostSyncWatch in the run before its capture, and a `Recording` while it is
    captured: hooks inside find it there (see the module's description). `context` is what the
    call's decisions read at replay. `agree(ok)` is True when every process sharing the call says ok
    (`alone` for one process): ranks capture together or not at all."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.captured: dict[int, CapturedCall] = {}

    def run(self, order: GraphOrder, function, args, kwargs, context, counts: CallCounts,
            agree: Callable[[bool], bool] = alone):
        """(the call's result, why its capture failed or None)."""
        for number in order.released:
            self.captured.pop(number, None)
        if order.action == REPLAY:
            captured = self.captured[order.number]
            counts.replayed += 1
            counts.segments_replayed += captured.segments
            counts.deciders.update(captured.deciders)
            return captured.replay(self.recorder, args, kwargs, context), None
        counts.eager += 1
        if order.action == LAUNCH:
            return function(None, *args, **kwargs), None
        return self.run_and_capture(order.number, function, args, kwargs, counts, agree)

    def run_and_capture(self, number, function, args, kwargs, counts, agree):
        # The call runs as is (its result is this call's), watched for host syncs, which a capture
        # cannot hold; then the capture records the same work without running it. The first call with
        # this signature already did the lazy set-up (CUDA's recipe warms up before capturing).
        with self.recorder.watch_host_syncs() as watch:
            result = function(watch, *args, **kwargs)
        failure = f"it waits for the GPU on the host: {watch.syncs[0]}" if watch.syncs else None
        if not agree(failure is None):
            return result, failure or "another rank's call waits for the GPU on the host"
        captured = None
        try:
            captured = self.capture(function, args, kwargs)
        except Exception as error:  # an operation a capture cannot hold
            failure = str(error) or type(error).__name__
        if not agree(captured is not None):
            return result, failure or "another rank's capture failed"
        self.captured[number] = captured
        counts.captured += 1
        counts.segments_captured += sum(len(stage.graphs) for stage in captured.stages)
        return result, None

    def capture(self, function, args, kwargs) -> CapturedCall:
        static_args, static_kwargs = cloned_tensors((args, kwargs))
        recording = self.record(function, static_args, static_kwargs, kept={})
        if recording.missing:
            # Captured again with the tensors kept across calls allocated now, outside the pool.
            kept = {name: torch.zeros(shape, dtype=dtype, device=device)
                    for name, (shape, dtype, device) in recording.missing.items()}
            recording = self.record(function, static_args, static_kwargs, kept)
            if recording.missing:
                raise RuntimeError(f"captured again, the call asked for other tensors to keep: {sorted(recording.missing)}")
        return CapturedCall(tensor_leaves((static_args, static_kwargs)), recording.output, recording.stages,
                            recording.prepare, tuple(recording.deciders))

    def record(self, function, static_args, static_kwargs, kept) -> Recording:
        recording = Recording(self.recorder, kept)
        recording.start()
        try:
            recording.output = function(recording, *static_args, **static_kwargs)
            recording.finish()
        except BaseException:
            recording.abandon()
            raise
        return recording

    def release(self):
        """Drops every graph and the memory they hold (the model was unloaded)."""
        self.captured.clear()
        self.recorder.release()


class ReplayedCalls:
    """A planner and the calls it captured, in a process that runs its calls alone (no other ranks)."""

    def __init__(self, name, recorder):
        self.planner = CapturePlanner(name)
        self.calls = CapturedCalls(recorder)

    def __call__(self, signature, function, args, kwargs, context, counts: CallCounts):
        order = self.planner.order(signature)
        result, failure = self.calls.run(order, function, args, kwargs, context, counts)
        self.planner.settle(signature, order, failure)
        return result

    def release(self):
        self.planner.release()
        self.calls.release()
