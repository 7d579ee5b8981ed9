"""An eager stand-in for CUDA graphs on the CPU: the pack's replay code tested without a GPU.

`TapeRecorder` has `kernels.compile.cuda_graphs.CudaGraphRecorder`'s interface. A recording is a
TorchDispatchMode that keeps every ATen operation run under it, with its arguments and results; a
replay runs the operations again on the same tensor objects. So, as with a CUDA graph, a replay reads
whatever the tensors the recording saw hold now, writes into the tensors the recording produced, and
runs none of the recorded call's host code: a value the replay needs that only host code would have
put in place is missing, and the test sees a different result.

Replay of each operation: an allocation (`empty`) is skipped; one that returns a view of its input
is not rerun (its result still is that view); one that writes into its arguments is rerun; any
other is rerun and its results copied into the recorded ones. An operation that returns a Python
value (`.item()`, `bool(tensor)`) fails the recording, as waiting for the GPU fails a CUDA graph
capture, and counts as a host sync in the watched run before a capture.

Graph memory: each replayed call starts with NaN in every tensor a recording allocated, since in a
CUDA graph pool nothing survives from one call to the next. What it does not reproduce: reuse of
memory within a call (the tape keeps every tensor it saw alive; the pool hands out only memory no
live tensor holds), kernels that bypass ATen's dispatcher (inductor's compiled code: the tests
replay uncompiled models), host reads that bypass it (`Tensor.tolist` on the CPU), streams.
"""
import contextlib

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


# Allocations: a CUDA graph replays no kernel for them, so their tensors keep what was written since.
ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided"}


def returns_host_value(func) -> bool:
    return any("Tensor" not in str(value.type) for value in func._schema.returns)


def allocates(func) -> bool:
    """Whether the operation's results are new tensors (not views of, or writes into, its arguments)."""
    schema = func._schema
    return not schema.is_mutable and all(value.alias_info is None for value in schema.returns)


class Tape(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operations = []
        self.allocated = []  # the tensors the recording allocated: a CUDA graph's pool memory

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if returns_host_value(func):
            raise RuntimeError(f"{func} reads a value on the host while a call is recorded")
        result = func(*args, **kwargs)
        self.operations.append((func, args, kwargs, result))
        if allocates(func):
            self.allocated += [tensor for tensor in pytree.tree_leaves(result) if torch.is_tensor(tensor)]
        return result

    def replay(self):
        for func, args, kwargs, result in self.operations:
            if func._schema.name in ALLOCATIONS:
                continue
            if func._schema.is_mutable:
                func(*args, **kwargs)
            elif allocates(func):
                fresh = func(*args, **kwargs)
                for recorded, new in zip(pytree.tree_leaves(result), pytree.tree_leaves(fresh)):
                    if torch.is_tensor(recorded):
                        recorded.copy_(new)


class HostReadWatch(TorchDispatchMode):
    """The stand-in's HostSyncWatch: operations that return a Python value, outside `host_decision()`."""

    def __init__(self):
        super().__init__()
        self.syncs = []
        self._decisions = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._decisions == 0 and returns_host_value(func):
            self.syncs.append(f"{func} read a value on the host")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def host_decision(self):
        self._decisions += 1
        try:
            yield
        finally:
            self._decisions -= 1


def poison(tensor: torch.Tensor):
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    elif tensor.dtype != torch.bool:
        tensor.fill_(torch.iinfo(tensor.dtype).min)


class TapeRecorder:
    """CudaGraphRecorder's interface over `Tape`s, for models on the CPU.

    Each replayed call starts with NaN in every tensor any recording allocated: in a CUDA graph pool
    nothing survives from one call to the next (other calls' graphs, and this call's own earlier
    segments, may reuse the memory), so a value a call leaves there for a later one is lost here too."""

    def __init__(self):
        self.replays = 0
        self.tapes = []

    @staticmethod
    def records_on(device) -> bool:
        return device.type == "cpu"

    @staticmethod
    def watch_host_syncs() -> HostReadWatch:
        return HostReadWatch()

    @staticmethod
    def begin() -> Tape:
        tape = Tape()
        tape.__enter__()
        return tape

    def end(self, tape: Tape) -> Tape:
        tape.__exit__(None, None, None)
        self.tapes.append(tape)
        return tape

    @staticmethod
    def abandon(tape: Tape):
        tape.__exit__(None, None, None)

    def replay_call(self, tapes):
        with torch.no_grad():
            for recorded in self.tapes:
                for tensor in recorded.allocated:
                    poison(tensor)
        for tape in tapes:
            self.replays += 1
            tape.replay()

    def release(self):
        pass
