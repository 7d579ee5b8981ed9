"""Whether and how the pack's Triton kernels run here: asked by every capability that has one."""
import importlib.util
import os

import torch

# PyTorch's CUDA wheels bring Triton on Linux, not on Windows. A constant rather than a cached function:
# compiled graphs read it, and Dynamo warns (once per process, in the user's log) when it traces into a
# functools cache.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_kernels_take(tensor):
    """Whether the pack's Triton kernels can run on `tensor`: a CUDA tensor, Triton installed."""
    return tensor.is_cuda and TRITON_INSTALLED


# Whether Triton runs kernels in its interpreter (where CI's CPU runs them), which TRITON_INTERPRET chooses
# before Triton is first imported. A constant, as TRITON_INSTALLED: kernel launches read it at every call.
TRITON_INTERPRETS = TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET", "0") == "1"
# Whether Triton compiles kernels to NVIDIA PTX (so that they may hold inline PTX): not in a ROCm build, not in
# the interpreter.
TRITON_EMITS_PTX = torch.version.hip is None and not TRITON_INTERPRETS


def compiles_to_ptx(tensor):
    """Whether Triton compiles a kernel on `tensor` to NVIDIA PTX: a CUDA tensor where Triton emits PTX."""
    return tensor.is_cuda and TRITON_EMITS_PTX
