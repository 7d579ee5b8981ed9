"""torch.compile of a model's repeated blocks, with the counts that show it did not recompile.

Regional compilation: blocks of one kind run the same code on weights of the same shapes, and
since torch 2.5 Dynamo treats a module's parameters as graph inputs, so one traced graph serves
every block of a kind. Compiling two graphs instead of a whole model is what makes the cold start
short, and parameters as inputs are why changed weights (a LoRA) need no recompilation.
"""
import contextlib
import functools
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..environment import environment_while
from . import inductor_heuristics

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# torch.compile's `dynamic`: None marks a dimension dynamic once it is seen to change (one
# recompilation per shape class), True compiles shape-generic graphs from the start, False
# compiles one graph per shape.
DYNAMIC_SHAPES = {"automatic": None, "dynamic": True, "static": False}
# Every FLUX in the process runs the same block code, so Dynamo's limit on cached graphs per code
# object (8 by default) is shared by all workflows: each settings combination, model variant (with
# First Block Cache or without) and shape class adds graphs, and past the limit Dynamo runs the
# blocks eagerly from then on.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class GraphPasses:
    """The rewrites a backend runs on every graph it compiles, handed over by the node that knows the model:
    the backend itself knows no model and no op of the pack.

    `before_inductor`: (name, rewrite) pairs; each rewrite takes Dynamo's graph module before inductor sees
    it and returns the number of sites it rewrote, counted under its name. `inductor_options`: functions
    that take the Counter of rewrites and return inductor config patches installing post-grad passes that
    count into it. Hashable (tuples of module-level functions): backends are shared per settings.
    """
    before_inductor: tuple = ()
    inductor_options: tuple = ()


class HeuristicsInCacheKey(CustomGraphPass):
    """A post-grad pass that rewrites nothing: its uuid puts the reduction heuristics the backend compiles
    under into inductor's cache key, so that changed heuristics compile anew instead of reusing graphs
    compiled under the old ones."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        pass

    def uuid(self):
        return get_hash_for_files((inductor_heuristics.__file__,))


@dataclass
class CompileCounter:
    graphs: int = 0
    seconds: float = 0.0
    # Sites each graph pass rewrote, by the pass's name. Inductor's passes (the FP8 ones) run only on graphs
    # it builds, not on those it finds in its on-disk cache, which `cached_graphs` counts.
    rewrites: Counter = field(default_factory=Counter)
    cached_graphs: int = 0


class CountingInductorBackend:
    """Inductor as a torch.compile backend that counts what it is given: every call is one graph
    (re)compiled, whether inductor builds it or finds it in its on-disk cache."""

    def __init__(self, mode="default", dynamic_shapes="automatic", passes=GraphPasses()):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}.")
        if dynamic_shapes not in DYNAMIC_SHAPES:
            raise ValueError(f"dynamic shapes must be one of {', '.join(DYNAMIC_SHAPES)}, got {dynamic_shapes!r}.")
        self.settings = (mode, dynamic_shapes)
        self.dynamic = DYNAMIC_SHAPES[dynamic_shapes]
        self.counter = CompileCounter()
        # Set by the node: where inductor caches this backend's graphs (compile_cache_folder_for).
        self.cache_folder = None
        self.passes = passes
        self.inductor_options = {**torch._inductor.list_mode_options(mode, self.dynamic),
                                 "post_grad_custom_pre_pass": HeuristicsInCacheKey()}
        for options in passes.inductor_options:
            self.inductor_options.update(options(self.counter.rewrites))
        # Called with the graph's number before each compilation, to tell the person waiting.
        self.on_compile_start = None

    def __call__(self, graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        if self.on_compile_start is not None:
            self.on_compile_start(self.counter.graphs + 1)
        started = time.perf_counter()
        for name, rewrite in self.passes.before_inductor:
            self.counter.rewrites[name] += rewrite(graph_module)
        cache_hits = inductor_cache_hits()
        with inductor_heuristics.wide_row_reductions(), inductor_cache_folder(self.cache_folder):
            compiled = compile_fx(graph_module, example_inputs, config_patches=self.inductor_options)
        self.counter.cached_graphs += inductor_cache_hits() - cache_hits
        self.counter.graphs += 1
        self.counter.seconds += time.perf_counter() - started
        return compiled


@functools.lru_cache(maxsize=None)
def shared_inductor_backend(mode="default", dynamic_shapes="automatic", passes=GraphPasses()):
    """The process's one backend for these settings. Dynamo keys its cached graphs on the backend
    object, so a new backend at every node execution would compile everything again."""
    return CountingInductorBackend(mode, dynamic_shapes, passes)


def raised_recompile_limit():
    """Dynamo's recompile limit raised to RECOMPILE_LIMIT while the pack's compiled blocks run (a
    sampling run), not for the process: other compiled code keeps the limit it had."""
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT))


def inductor_cache_hits():
    """Graphs inductor has found in its on-disk cache in this process so far."""
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]


def graph_break_count():
    """Graph breaks Dynamo has met in this process so far (all compiled code, not one model)."""
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def compile_cache_folder_for(folder):
    """Where the pack's compiles keep inductor's on-disk caches (compiled graphs, Triton kernels,
    autotuning): the user's TORCHINDUCTOR_CACHE_DIR where they chose one, else `folder`.

    Inductor's default folder lies under the system's temporary directory, which does not survive a
    reboot; a second process that finds the graphs in `folder` compiles in seconds.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its default into the variable on first use: that is not the user's choice.
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        return os.path.abspath(folder)
    return chosen


@contextlib.contextmanager
def inductor_cache_folder(folder):
    """Inductor's on-disk caches in `folder` for the compiles in the block; the process's other compiles
    (core's TorchCompileModel) keep their own. Inductor reads the folder from TORCHINDUCTOR_CACHE_DIR,
    through caches of its own that are cleared on the way in and out. (Triton's kernel cache goes where
    inductor's was when its compile workers started.)"""
    if folder is None:
        yield
        return
    from torch._inductor.utils import clear_caches

    os.makedirs(folder, exist_ok=True)
    with environment_while({"TORCHINDUCTOR_CACHE_DIR": folder}):
        clear_caches()
        try:
            yield
        finally:
            clear_caches()
