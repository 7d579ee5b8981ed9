"""Compile FLUX: torch.compile of FLUX's transformer blocks, one graph per block kind.

Hook-up, through ComfyUI's own extension points:
- core's torch.compile wrapper (`comfy_api.torch_helpers`' APPLY_MODEL wrapper, through
  `comfy_contract.set_compiled_modules`) swaps the compiled blocks in for each model call and back after
  it, so clones stay independent. What runs between blocks stays eager: First Block Cache's decision and
  other packs' block replacements call the compiled blocks; LoRA patches change parameters, which are
  graph inputs, so a new strength needs no recompilation. It replaces core TorchCompileModel's wrapper
  (the same key): one compile per model. The node compiles the blocks itself, to hook them: under
  automatic dynamic shapes, the recompile at a second size is generic in batch and prompt length too
  (`kernels.compile.regional_compile.SizeGenericRecompile`).
- an OUTER_SAMPLE wrapper reports, per sampling run, the graphs compiled and the graph breaks met.
- ComfyUI applies FLUX's RoPE through comfy_kitchen's custom ops, which the compiler cannot see into:
  each call costs its own kernel and, at every block, 0.2-0.4 ms of Python dispatch on the host, which
  FP8 blocks on an H100 no longer hide. An inductor decomposition gives the compiler the same math
  in plain torch ops to fuse with the q/k ops around it (registered for the process: torch cannot
  cache a compile given its own); where the q/k norms and the RoPE have FLUX's own form, the backend
  first hands them, with v, to one Triton kernel (`kernels.qk_norm_rope_graph_pass`).
- the rest of what the pack's compiles need is theirs alone: Dynamo's recompile limit is raised while
  the compiled model samples, and inductor's caches move to ComfyUI's user folder for the pack's
  compiles; core's TorchCompileModel on another model compiles as it would without the pack.
- the clone leaves ComfyUI's DynamicVRAM (the default on NVIDIA GPUs), which streams each layer's
  weights inside the block calls: that cuts every compiled block at each linear layer, and Dynamo's
  size-generic recompile at a second resolution failed on it (a shape error in the streamed linear).
- with `cuda_graphs` on, a DIFFUSION_MODEL wrapper replays each model call from CUDA graphs
  (`kernels.compile.cuda_graphs`), captured at the second call of each input shape and weight set. Host code
  in the forward runs only at capture, so it must decide nothing per call, or decide where it splits
  the capture: First Block Cache's blocks do (one graph up to the first block's distance, one of the
  two alternatives after it, one for the rest). Context Parallel replays each rank's share itself.
  Calls run launched, with the reason in the run's report, where other host code decides per call:
  other packs' block patches, another diffusion-model wrapper, layers streamed or patched per call
  (a partial load). Graphs are dropped when the model is unloaded.
The compiled graphs persist in ComfyUI's user folder, so a restarted ComfyUI compiles in seconds.
"""
import copy
import functools
import os

import torch
from typing_extensions import override

import comfy.patcher_extension
import folder_paths
from comfy_api.latest import ComfyExtension, io

from ..kernels.attention import qk_norm_rope_graph_pass
from ..kernels.attention.qk_norm_rope_graph_pass import QK_NORM_ROPE_SITES
from ..kernels.attention.rope import interleaved_rope
from ..kernels.compile.cuda_graphs import CallCounts, CudaGraphRecorder, ReplayedCalls, call_signature, weights_signature
from ..kernels.compile.regional_compile import (COMPILE_MODES, DYNAMIC_SHAPES, CompileCounter, CountingInductorBackend,
                                                GraphPasses, compile_blocks, compile_cache_folder_for, graph_break_count,
                                                raised_recompile_limit, shared_inductor_backend)
from ..kernels.fp8 import graph_pass as fp8_graph_pass
from ..kernels.fp8.graph_pass import GELU_SITES, LAYER_NORM_SITES
from . import CATEGORY, comfy_contract, flux_layout
from .patcher_hooks import keep_conds_on_device, non_dynamic_clone, set_callback, set_wrapper
from .reporting import report_run, report_to_sampler_node

NODE_NAME = comfy_contract.COMPILE
BACKEND_KEY = "fluxaccel.compile"
WRAPPER_KEY = "fluxaccel.compile"
CUDA_GRAPHS_KEY = "fluxaccel.cuda_graphs"
# transformer_options entries ComfyUI sets anew for every call; FLUX's forward does not read them.
PER_CALL_OPTIONS = ("uuids", "sigmas", "sample_sigmas")
# The graph passes' sites, in the order the run's line names them: q/k norm + RoPE in every block's
# attention inputs; with FP8 activations, the MLPs' GELU and the blocks' input layer norms in the FP8 rows.
GRAPH_PASS_SITES = (QK_NORM_ROPE_SITES, GELU_SITES, LAYER_NORM_SITES)
# What the backend runs on FLUX's block graphs: the q/k rewrite on Dynamo's graph, the FP8 rows' on inductor's.
FLUX_GRAPH_PASSES = GraphPasses(before_inductor=((QK_NORM_ROPE_SITES, qk_norm_rope_graph_pass.fuse_qk_norm_rope),),
                                inductor_options=(fp8_graph_pass.inductor_options,))
# The parts of a model call that decide whether a CUDA graph captured earlier can replay it.
CALL_PARTS = ("input shapes", "transformer options", "weights")


def compile_cache_folder():
    return os.path.join(folder_paths.get_user_directory(), "fluxaccel", "torch-compile-cache")


def block_keys(double_blocks, single_blocks):
    """The ComfyUI model paths of FLUX's blocks, as core's torch.compile wrapper takes them."""
    return ([f"diffusion_model.double_blocks.{i}" for i in range(double_blocks)]
            + [f"diffusion_model.single_blocks.{i}" for i in range(single_blocks)])


def compile_backend(mode, dynamic_shapes, cache_folder=None):
    """The process's backend for these settings (kernels.compile.regional_compile.shared_inductor_backend), its
    graphs cached by inductor in `cache_folder` (None: inductor's own), comfy_kitchen's RoPE ops decomposed."""
    fuse_comfy_kitchen_rope()
    backend = shared_inductor_backend(mode, dynamic_shapes, FLUX_GRAPH_PASSES)
    backend.cache_folder = cache_folder
    return backend


@functools.lru_cache(maxsize=None)
def fuse_comfy_kitchen_rope():
    """Registers inductor decompositions for comfy_kitchen's RoPE ops, once per process. They hold for
    every compile in the process (core's TorchCompileModel too), with the same results: torch takes
    decompositions for one compile only by leaving its on-disk cache out (it cannot key them)."""
    from torch._inductor.decomposition import register_decomposition

    ops = comfy_contract.kitchen_rope_ops()
    if ops is None:
        return
    apply_rope, apply_rope1 = ops
    register_decomposition([apply_rope])(
        lambda xq, xk, freqs_cis: (interleaved_rope(xq, freqs_cis), interleaved_rope(xk, freqs_cis)))
    register_decomposition([apply_rope1])(interleaved_rope)
    forget_inductors_decomposition_snapshot()


def forget_inductors_decomposition_snapshot():
    """Inductor copies its decomposition table at the process's first compilation and uses the copy
    from then on. After any earlier torch.compile (core's TorchCompileModel, another pack) the copy
    lacks the ops registered since: torch 2.11 then refuses to compile them ("both a fallback and a
    decomp for same op"), later versions leave them unfused. The next compilation copies it afresh."""
    snapshot = getattr(torch._inductor.decomposition, "fast_random_decomps", None)
    if hasattr(snapshot, "cache_clear"):
        snapshot.cache_clear()


def compile_summary(before: CompileCounter, after: CompileCounter, graph_breaks):
    """The run's line: graphs compiled, what each graph pass rewrote in them (a pass that stops matching
    ComfyUI's FLUX blocks shows as 0), graph breaks."""
    graphs = after.graphs - before.graphs
    if graphs == 0:
        return "Compile FLUX: no graph compiled this run (all shapes seen before)"
    plural = "s" if graphs > 1 else ""
    rewrites = after.rewrites - before.rewrites
    passes = ", ".join(f"{rewrites[name]} {name}" for name in GRAPH_PASS_SITES)
    cached = after.cached_graphs - before.cached_graphs
    if cached:
        passes += (f" ({cached} of the graphs from inductor's cache, where the FP8 passes had run when they were "
                   "built)")
    return (f"Compile FLUX: {graphs} graph{plural} compiled this run ({after.seconds - before.seconds:.1f} s in "
            f"inductor), sites rewritten: {passes}, {graph_breaks} graph breaks")


def announce_compile(graph_number):
    """Shown on the sampler node while a graph compiles: the first run at a new size waits for it."""
    report_to_sampler_node(f"Compile FLUX: compiling graph {graph_number} of this process "
                           "(once per block kind and size class; kept on disk for later runs)...", passing=True)


def cuda_graphs_summary(counts: CallCounts, bypass_reason, changed):
    if counts.replayed == 0 and bypass_reason is not None:
        return f"CUDA graphs not used: {bypass_reason}"
    calls = counts.replayed + counts.eager
    summary = f"{counts.replayed} of {calls} model calls replayed from CUDA graphs"
    if counts.deciders:
        summary += (f" ({counts.segments_replayed} graph segments, split where {' and '.join(sorted(counts.deciders))} "
                    f"decides; {counts.captured} call{'' if counts.captured == 1 else 's'} captured, "
                    f"in {counts.segments_captured} segments)")
    else:
        summary += f" ({counts.captured} captured)"
    return summary + (f"; changed from call to call: {', '.join(sorted(changed))}" if changed else "")


def sample_with_compile_report(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: counts what this sampling run compiled and replayed, and reports it."""
    model_options = executor.class_obj.model_options
    backend: CountingInductorBackend = model_options[BACKEND_KEY]
    forward_graphs: ReplayedForward | None = model_options.get(CUDA_GRAPHS_KEY)
    before, breaks = copy.deepcopy(backend.counter), graph_break_count()
    if forward_graphs is not None:
        forward_graphs.start_run()
    try:
        with raised_recompile_limit():
            return executor(*args, **kwargs)
    finally:
        summary = compile_summary(before, backend.counter, graph_break_count() - breaks)
        if forward_graphs is not None:
            summary += "; " + cuda_graphs_summary(forward_graphs.counts, forward_graphs.bypass_reason,
                                                  forward_graphs.changed)
        report_run(summary)


class ReplayedForward:
    """DIFFUSION_MODEL wrapper: FLUX's forward replayed from CUDA graphs where its host code decides
    nothing per call, or only where it splits the graphs; otherwise run as is, with the reason kept
    for the run's report. The run's counts and reason are also where Context Parallel, which replays
    each rank's share itself, reports what it did."""

    def __init__(self, recorder=None):
        self.recorder = recorder or CudaGraphRecorder()
        self.graphs = ReplayedCalls(NODE_NAME, self.recorder)
        self.counts = CallCounts()
        self.bypass_reason = None
        # What made calls differ this run (each difference means a capture), for the run's report.
        self.changed = set()
        self.previous_parts = None

    def start_run(self):
        self.counts = CallCounts()
        self.bypass_reason = None
        self.changed = set()

    def __call__(self, executor, *args, **kwargs):
        diffusion_model = executor.class_obj
        inputs, transformer_options = comfy_contract.forward_inputs(diffusion_model, args, kwargs)
        if replaying_wrapper_inside(transformer_options):
            return executor(*args, **kwargs)
        values = tuple(inputs.values())
        signature = self.signature(diffusion_model, values, {}, transformer_options)
        if signature is None:
            return executor(*args, **kwargs)

        def forward(graph_pass, *call_values):
            call_options = flux_layout.with_graph_pass(transformer_options, graph_pass)
            call_args, call_kwargs = comfy_contract.forward_call(diffusion_model, dict(zip(inputs, call_values)),
                                                                 call_options)
            return executor(*call_args, **call_kwargs)

        return self.graphs(signature, forward, values, {}, transformer_options, self.counts)

    def signature(self, diffusion_model, inputs, kwargs, transformer_options):
        """The call's signature (see kernels.compile.cuda_graphs.call_signature) from the forward's inputs
        (x first) and the transformer options; None where the call cannot be replayed, the reason kept
        for the run's report."""
        reason = replay_blocker(self.recorder, diffusion_model, inputs[0], transformer_options)
        options = None if reason else call_signature((), forward_options(transformer_options), ())
        if reason or options is None:
            self.bypass_reason = reason or "the model's transformer options hold values that cannot be compared"
            return None
        parts = (call_signature(tuple(inputs), kwargs, ()), options, weights_signature(diffusion_model))
        self.note_changes(parts)
        return call_signature(tuple(inputs), kwargs, parts[1:])

    def note_changes(self, parts):
        if self.previous_parts is not None:
            self.changed.update(name for name, part, previous in zip(CALL_PARTS, parts, self.previous_parts)
                                if part != previous)
        self.previous_parts = parts

    def release(self, model_patcher, unpatch_all):
        """ON_DETACH callback: an unloaded model's graphs and their memory go. ComfyUI also detaches a
        loaded model, weights left in place (unpatch_all false), each time a run asks for it again."""
        if unpatch_all:
            self.graphs.release()


def forward_options(transformer_options):
    """The transformer options FLUX's forward may read (attention override, RoPE options, wrappers),
    without the per-call ones; a value with a `graph_signature(transformer_options)` (First Block
    Cache's run) is described by what that returns instead of by itself."""
    described = {}
    for key, value in transformer_options.items():
        if key not in PER_CALL_OPTIONS:
            describe = getattr(value, "graph_signature", None)
            described[key] = value if describe is None else describe(transformer_options)
    return described


def replaying_wrapper_inside(transformer_options) -> bool:
    """Whether another DIFFUSION_MODEL wrapper replays the forward from CUDA graphs itself (Context
    Parallel, each rank's share): this wrapper then leaves the call to it."""
    wrappers = transformer_options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    return any(getattr(function, "replays_cuda_graphs", False)
               for key, functions in wrappers.items() if key != CUDA_GRAPHS_KEY for function in functions)


def replay_blocker(recorder, diffusion_model, x, transformer_options):
    """Why a call's host code may decide differently from call to call outside the points where it
    splits the graphs, or None."""
    if not recorder.records_on(x.device):
        return f"the model runs on {x.device.type}, not on a CUDA GPU"
    if patches := [str(name) for name, entries in transformer_options.get("patches", {}).items() if entries]:
        return f"another node's model patches ({', '.join(patches)}) decide on the host at every step"
    replaced = [position for replacements in transformer_options.get("patches_replace", {}).values()
                for position, replacement in replacements.items() if not getattr(replacement, "graph_replayable", False)]
    if replaced:
        return (f"another node's block replacements ({', '.join(map(str, replaced[:3]))}"
                f"{', ...' if len(replaced) > 3 else ''}) decide on the host at every step")
    wrappers = transformer_options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    if others := [key for key, functions in wrappers.items() if key != CUDA_GRAPHS_KEY
                  and not all(getattr(function, "replays_cuda_graphs", False) for function in functions)]:
        return f"another node wraps the diffusion model ({', '.join(map(str, others))})"
    if any(streamed_or_patched_per_call(module, x.device) for module in diffusion_model.modules()):
        return "ComfyUI streams or patches some weights in every call (a partial load: not enough free VRAM)"
    return None


def streamed_or_patched_per_call(module, device):
    """Whether ComfyUI moves the layer's weights to `device` or applies weight functions (LoRA on
    offloaded weights) to them in every call."""
    return (getattr(module, "weight_function", None) or getattr(module, "bias_function", None)
            or any(parameter is not None and parameter.device != device for parameter in module._parameters.values()))


def use_cuda_graphs(model_patcher, enabled, recorder=None):
    """Adds, or with `enabled` false removes, the CUDA-graph replay of the model's forward; `recorder`
    records and replays the graphs (CUDA's, unless a test hands in its CPU stand-in)."""
    if not enabled:
        model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CUDA_GRAPHS_KEY)
        model_patcher.remove_callbacks_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, CUDA_GRAPHS_KEY)
        model_patcher.model_options.pop(CUDA_GRAPHS_KEY, None)
        return
    forward_graphs = ReplayedForward(recorder)
    set_wrapper(model_patcher, comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CUDA_GRAPHS_KEY, forward_graphs)
    set_callback(model_patcher, comfy.patcher_extension.CallbacksMP.ON_DETACH, CUDA_GRAPHS_KEY, forward_graphs.release)
    model_patcher.model_options[CUDA_GRAPHS_KEY] = forward_graphs


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
                    "mode", options=list(COMPILE_MODES), default="default", advanced=True,
                    tooltip=("default: fast compile. max-autotune-no-cudagraphs: benchmarks kernel choices while "
                             "compiling: a first run of many minutes (over six for FLUX.1-dev on an H200), sometimes "
                             "a little faster after.")),
                io.Combo.Input(
                    "dynamic_shapes", options=list(DYNAMIC_SHAPES), default="automatic", advanced=True,
                    tooltip=("automatic: the first size compiles fixed-shape graphs, a second size recompiles them "
                             "once as graphs generic in resolution, batch and prompt length; the first run with the "
                             "other kind of batch (one image, or several: cfg makes two) recompiles once more. "
                             "dynamic: those generic graphs from the first run. static: one graph set per size (a "
                             "recompile for each new resolution or batch).")),
                io.Boolean.Input(
                    "cuda_graphs", default=True, optional=True,
                    tooltip=("Replays each model call from a CUDA graph (captured at the second call of each size), "
                             "so the GPU never waits for the CPU to issue its work: faster on a busy machine. "
                             "First Block Cache and Context Parallel split each call into graphs where they decide. "
                             "Not used, and said so on the sampler node, where something else decides on the CPU at "
                             "every step (other nodes' block patches, a partial load). Keeps about one model call's "
                             "activations in VRAM while the model stays loaded.")),
            ],
            outputs=[io.Model.Output(tooltip="The same model; its blocks run compiled while sampling.")],
        )

    @classmethod
    def execute(cls, model, mode, dynamic_shapes, cuda_graphs=True) -> io.NodeOutput:
        diffusion_model = flux_layout.flux_diffusion_model(model, NODE_NAME)
        backend = compile_backend(mode, dynamic_shapes, compile_cache_folder_for(compile_cache_folder()))
        backend.on_compile_start = announce_compile
        patched = non_dynamic_clone(model, NODE_NAME)
        blocks = {key: patched.get_model_object(key) for key in block_keys(*flux_layout.block_counts(diffusion_model))}
        compiled_blocks = compile_blocks(blocks, backend, flux_layout.VARYING_BLOCK_INPUT_DIMS)
        comfy_contract.set_compiled_modules(patched, compiled_blocks, {"backend": backend, "dynamic": backend.dynamic})
        patched.model_options[BACKEND_KEY] = backend
        set_wrapper(patched, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sample_with_compile_report)
        use_cuda_graphs(patched, cuda_graphs)
        keep_conds_on_device(patched)
        return io.NodeOutput(patched)


class CompileExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CompileFlux]
