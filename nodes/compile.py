"""Compile FLUX: torch.compile of FLUX's transformer blocks, one graph per block kind.

Hook-up, through ComfyUI's own extension points:
- `comfy_api.torch_helpers.set_torch_compile_wrapper` with one key per block: its APPLY_MODEL
  wrapper swaps the compiled blocks in for each model call and back after it, so clones stay
  independent. What runs between blocks stays eager: First Block Cache's decision and other packs'
  block replacements call the compiled blocks; LoRA patches change parameters, which are graph
  inputs, so a new strength needs no recompilation. It replaces core TorchCompileModel's wrapper
  (the same key): one compile per model.
- an OUTER_SAMPLE wrapper reports, per sampling run, the graphs compiled and the graph breaks met.
- ComfyUI applies FLUX's RoPE through comfy_kitchen's custom ops, which the compiler cannot see into:
  each call costs its own kernel and, at every block, 0.2-0.4 ms of Python dispatch on the host, which
  FP8 blocks on an H100 no longer hide. An inductor decomposition gives the compiler the same math
  in plain torch ops to fuse with the q/k ops around it; where the q/k norms and the RoPE have FLUX's
  own form, the backend first hands them, with v, to one Triton kernel (`kernels.qk_norm_rope_fusion`).
- the clone leaves ComfyUI's DynamicVRAM (the default on NVIDIA GPUs), which streams each layer's
  weights inside the block calls: that cuts every compiled block at each linear layer, and Dynamo's
  size-generic recompile at a second resolution failed on it (a shape error in the streamed linear).
The compiled graphs persist in ComfyUI's user folder, so a restarted ComfyUI compiles in seconds.
"""
import functools
import os

import torch
from typing_extensions import override

import comfy.patcher_extension
import folder_paths
from comfy_api.latest import ComfyExtension, io
from comfy_api.torch_helpers import set_torch_compile_wrapper

from ..kernels.regional_compile import (COMPILE_MODES, DYNAMIC_SHAPES, CountingInductorBackend, graph_break_count,
                                        shared_inductor_backend, use_persistent_compile_cache)
from ..kernels.rope import interleaved_rope
from . import CATEGORY, flux_layout
from .patcher_hooks import keep_conds_on_device, non_dynamic_clone, set_wrapper
from .reporting import report_run, report_to_sampler_node

NODE_NAME = "Compile FLUX"
BACKEND_KEY = "fluxaccel.compile"
WRAPPER_KEY = "fluxaccel.compile"


def compile_cache_folder():
    return os.path.join(folder_paths.get_user_directory(), "fluxaccel", "torch-compile-cache")


def block_keys(double_blocks, single_blocks):
    """The ComfyUI model paths of FLUX's blocks, as `set_torch_compile_wrapper` takes them."""
    return ([f"diffusion_model.double_blocks.{i}" for i in range(double_blocks)]
            + [f"diffusion_model.single_blocks.{i}" for i in range(single_blocks)])


@functools.lru_cache(maxsize=None)
def fuse_comfy_kitchen_rope():
    """Registers inductor decompositions for comfy_kitchen's RoPE ops (once per process; every
    compiled model in the process gets them, with the same results)."""
    from torch._inductor.decomposition import register_decomposition

    ops = getattr(torch.ops, "comfy_kitchen", None)
    if ops is None or not hasattr(ops, "apply_rope"):
        return
    register_decomposition([ops.apply_rope.default])(
        lambda xq, xk, freqs_cis: (interleaved_rope(xq, freqs_cis), interleaved_rope(xk, freqs_cis)))
    register_decomposition([ops.apply_rope1.default])(interleaved_rope)
    forget_inductors_decomposition_snapshot()


def forget_inductors_decomposition_snapshot():
    """Inductor copies its decomposition table at the process's first compilation and uses the copy
    from then on. After any earlier torch.compile (core's TorchCompileModel, another pack) the copy
    lacks the ops registered since: torch 2.11 then refuses to compile them ("both a fallback and a
    decomp for same op"), later versions leave them unfused. The next compilation copies it afresh."""
    snapshot = getattr(torch._inductor.decomposition, "fast_random_decomps", None)
    if hasattr(snapshot, "cache_clear"):
        snapshot.cache_clear()


def compile_summary(graphs, graph_breaks, inductor_seconds):
    if graphs == 0:
        return "Compile FLUX: no graph compiled this run (all shapes seen before)"
    plural = "s" if graphs > 1 else ""
    return (f"Compile FLUX: {graphs} graph{plural} compiled this run ({inductor_seconds:.1f} s in inductor), "
            f"{graph_breaks} graph breaks")


def announce_compile(graph_number):
    """Shown on the sampler node while a graph compiles: the first run at a new size waits for it."""
    report_to_sampler_node(f"Compile FLUX: compiling graph {graph_number} of this process "
                           "(once per block kind and size class; kept on disk for later runs)...")


def sample_with_compile_report(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: counts what this sampling run compiled and reports it."""
    backend: CountingInductorBackend = executor.class_obj.model_options[BACKEND_KEY]
    graphs, seconds, breaks = backend.counter.graphs, backend.counter.seconds, graph_break_count()
    try:
        return executor(*args, **kwargs)
    finally:
        report_run(compile_summary(backend.counter.graphs - graphs, graph_break_count() - breaks,
                                   backend.counter.seconds - seconds))


class CompileFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FluxAccelCompile",
            display_name=NODE_NAME,
            category=CATEGORY,
            description=(
                "Compiles FLUX's transformer blocks with torch.compile (inductor): one graph for the double "
                "blocks and one for the single blocks, reused by all of them, so the first run compiles in "
                "seconds rather than minutes. Compiled graphs are kept in ComfyUI's user folder for the next "
                "start. The sampler node shows how many graphs each run compiled."),
            inputs=[
                io.Model.Input("model", tooltip=flux_layout.MODEL_INPUT_TOOLTIP),
                io.Combo.Input(
                    "mode", options=list(COMPILE_MODES), default="default",
                    tooltip=("default: fast compile. max-autotune-no-cudagraphs: benchmarks kernel choices while "
                             "compiling: a first run of many minutes (over six for FLUX.1-dev on an H200), sometimes "
                             "a little faster after.")),
                io.Combo.Input(
                    "dynamic_shapes", options=list(DYNAMIC_SHAPES), default="automatic",
                    tooltip=("automatic: the first size compiles fixed-shape graphs, a second size recompiles them "
                             "once as size-generic graphs that serve every later resolution, batch and prompt length. "
                             "dynamic: size-generic from the first run. static: one graph set per size (a recompile "
                             "for each new resolution or batch).")),
            ],
            outputs=[io.Model.Output(tooltip="The same model; its blocks run compiled while sampling.")],
        )

    @classmethod
    def execute(cls, model, mode, dynamic_shapes) -> io.NodeOutput:
        diffusion_model = flux_layout.flux_diffusion_model(model, NODE_NAME)
        backend = shared_inductor_backend(mode, dynamic_shapes)
        backend.on_compile_start = announce_compile
        fuse_comfy_kitchen_rope()
        use_persistent_compile_cache(compile_cache_folder())
        patched = non_dynamic_clone(model, NODE_NAME)
        set_torch_compile_wrapper(patched, backend=backend, dynamic=backend.dynamic,
                                  keys=block_keys(*flux_layout.block_counts(diffusion_model)))
        patched.model_options[BACKEND_KEY] = backend
        set_wrapper(patched, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sample_with_compile_report)
        keep_conds_on_device(patched)
        return io.NodeOutput(patched)


class CompileExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CompileFlux]
