"""Compile FLUX through ComfyUI's real ModelPatcher and KSampler, compiled by inductor on the CPU."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

import comfy.model_management
import comfy.patcher_extension
import comfy.quant_ops

import folder_paths
from conftest import COMFYUI_DIR, PACK_DIR, cpu_machine_only, needs_cuda
from fluxaccel.kernels.attention import qk_norm_rope_graph_pass
from fluxaccel.kernels.compile.regional_compile import RECOMPILE_LIMIT, compile_cache_folder_for
from fluxaccel.nodes import compile as compile_node
from fluxaccel.nodes.compile import BACKEND_KEY, CUDA_GRAPHS_KEY, CompileFlux, compile_cache_folder
from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize
from tests.support.cache_reports import cuda_graphs_report, parse_compile_report
from tests.support.flux_fixtures import tiny_flux_patcher
from tests.support.ksampler_helpers import (assert_replays_as_launched, cache_summaries, conditioning, gpu_like_flux,
                                            ksample, no_room_to_batch, relative_error, tiny_lora, with_block_cache,
                                            with_cache, with_lora)

# fp32 on the CPU: inductor's fused kernels reorder sums, nothing more.
FP32_ROUNDING = 1e-5


def compiled(model, dynamic_shapes="automatic"):
    return CompileFlux.execute(model, "default", dynamic_shapes).result[0]


def graphs_compiled_per_run(caplog):
    return [graphs for record in caplog.records if (graphs := parse_compile_report(record.getMessage())) is not None]


def cuda_graph_reports(caplog):
    """What each run's Compile FLUX report says about CUDA graphs."""
    return [report for record in caplog.records if (report := cuda_graphs_report(record.getMessage())) is not None]


def graph_break_reports(caplog):
    """Each run's Compile FLUX report up to its graph breaks (what it says about CUDA graphs follows)."""
    return [message.partition("; ")[0] for record in caplog.records if "graph breaks" in (message := record.getMessage())]


class BlockOutputRecorder:
    """A block replacement (as another pack would add) that keeps each block's output at the first model call."""

    def __init__(self):
        self.outputs = {}

    def __call__(self, args, extra):
        out = extra["original_block"](args)
        position = (args["transformer_options"]["block_type"], args["transformer_options"]["block_index"])
        self.outputs.setdefault(position, {name: value.clone() for name, value in out.items()})
        return out


def recording_blocks(model):
    recorder, recorded = BlockOutputRecorder(), model.clone()
    for kind, count in (("double", 2), ("single", 3)):
        for index in range(count):
            recorded.set_model_patch_replace(recorder, "dit", f"{kind}_block", index)
    return recorded, recorder


def test_compiled_blocks_match_eager_block_by_block(caplog_info):
    model = gpu_like_flux()
    eager_model, eager_blocks = recording_blocks(model)
    compiled_model, compiled_blocks = recording_blocks(compiled(model))
    eager = ksample(eager_model)
    assert relative_error(ksample(compiled_model), eager) < FP32_ROUNDING
    assert set(compiled_blocks.outputs) == set(eager_blocks.outputs) and len(eager_blocks.outputs) == 5
    for position, outputs in eager_blocks.outputs.items():
        for name, expected in outputs.items():
            assert relative_error(compiled_blocks.outputs[position][name], expected) < FP32_ROUNDING, (position, name)
    assert graphs_compiled_per_run(caplog_info)[0] > 0
    assert graph_break_reports(caplog_info)[0].endswith(", 0 graph breaks")


def test_both_block_graphs_take_their_attention_inputs_from_the_fused_op(monkeypatch):
    """ComfyUI's FLUX blocks build q, k and v in the form the rewrite knows: a ComfyUI release that changes
    them shows here, not as a silent slowdown. (A width no other test compiles: graphs compile anew.)"""
    rewrites, fuse = [], qk_norm_rope_graph_pass.fuse_qk_norm_rope

    def counted_fuse(graph):
        rewrites.append(fuse(graph))
        return rewrites[-1]

    # Compile FLUX hands its backend this pass in place of the plain one (a backend of its own: compiles anew).
    passes = compile_node.FLUX_GRAPH_PASSES
    monkeypatch.setattr(compile_node, "FLUX_GRAPH_PASSES", dataclasses.replace(
        passes, before_inductor=((qk_norm_rope_graph_pass.QK_NORM_ROPE_SITES, counted_fuse),)))
    model = gpu_like_flux(hidden_size=80)
    eager = ksample(model)
    assert relative_error(ksample(compiled(model)), eager) < FP32_ROUNDING
    # One rewrite in each graph compiled: a double and a single block's, and any recompile of them.
    assert len(rewrites) >= 2 and set(rewrites) == {1}


# What the sweep changes from run to run: three sizes (the graphs go size-generic at the second under
# automatic dynamic shapes), then a batch of two, an 11-token prompt (and another seed), cfg's cond and uncond
# in one batch of two, and batch, size and prompt length all at once.
SWEEP = [dict(size=32), dict(size=48), dict(size=64), dict(size=48, batch_size=2),
         dict(size=32, positive=conditioning(tokens=11, seed=3), seed=7), dict(size=64, cfg=2.0),
         dict(size=40, batch_size=2, positive=conditioning(tokens=9, seed=4))]
# A compile of the tiny FLUX's blocks: one graph per block kind, double and single (no graph breaks).
BLOCK_GRAPHS = 2


# Widths no other test compiles, so that the sweep's first size is the first its blocks see.
@pytest.mark.parametrize("dynamic_shapes, width, second_size", [("automatic", 96, BLOCK_GRAPHS), ("dynamic", 32, 0)])
def test_a_sweep_recompiles_only_at_the_second_size_and_the_first_batch_of_two(dynamic_shapes, width, second_size,
                                                                               caplog_info):
    """The size-generic graphs (from the second size under automatic, from the first under dynamic) are generic
    in resolution, batch and prompt length at once. Dynamo compiles a batch of one as a constant, and the graphs
    differ there, so the first batch of two recompiles once: nothing else does, and the second pass nothing."""
    model = compiled(gpu_like_flux(hidden_size=width), dynamic_shapes)
    for settings in SWEEP:
        ksample(model, steps=2, **settings)
    assert graphs_compiled_per_run(caplog_info) == [BLOCK_GRAPHS, second_size, 0, BLOCK_GRAPHS, 0, 0, 0]
    caplog_info.clear()
    for settings in SWEEP:
        ksample(model, steps=2, **settings)
    assert graphs_compiled_per_run(caplog_info) == [0] * len(SWEEP)


def test_lora_strength_change_is_seen_without_recompiling(caplog_info):
    model = gpu_like_flux()
    lora = tiny_lora(model)
    compiled_model = compiled(model)
    for strength in (0.5, 1.0):
        expected = ksample(with_lora(model, lora, strength))
        assert relative_error(ksample(with_lora(compiled_model, lora, strength)), expected) < FP32_ROUNDING
    assert graphs_compiled_per_run(caplog_info)[-1] == 0, "a new LoRA strength changes weights, not graphs"
    assert relative_error(ksample(with_lora(model, lora, 0.5)), ksample(with_lora(model, lora, 1.0))) > 1e-3


@pytest.mark.parametrize("cache_first", [True, False])
def test_composes_with_first_block_cache_in_either_order(cache_first, caplog_info):
    model = gpu_like_flux()
    expected = ksample(with_cache(model, 0.8), steps=8)
    eager_reuse = cache_summaries(caplog_info)[-1]
    stacked = compiled(with_cache(model, 0.8)) if cache_first else with_cache(compiled(model), 0.8)
    assert relative_error(ksample(stacked, steps=8), expected) < FP32_ROUNDING
    assert graphs_compiled_per_run(caplog_info), "the blocks ran under Compile FLUX"
    assert cache_summaries(caplog_info)[-1] == eager_reuse and eager_reuse[2] > 0, "same steps reused as eager"


@cpu_machine_only
def test_works_with_comfyuis_cpu_attention_despite_graph_breaks(caplog_info):
    model = tiny_flux_patcher()
    assert relative_error(ksample(compiled(model), steps=2), ksample(model, steps=2)) < FP32_ROUNDING
    assert not graph_break_reports(caplog_info)[0].endswith(", 0 graph breaks")


def test_input_model_is_untouched():
    model = gpu_like_flux()
    before = ksample(model)
    compiled(model)
    assert BACKEND_KEY not in model.model_options
    assert torch.equal(ksample(model), before)


def test_non_flux_model_gets_a_clear_error():
    model = tiny_flux_patcher()
    model.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Compile FLUX supports FLUX.1 .dev, schnell, Kontext., FLUX.2 .*diffusion model is Linear"):
        compiled(model)


def test_bad_option_gets_a_clear_error():
    with pytest.raises(ValueError, match="dynamic shapes must be one of automatic, dynamic, static"):
        CompileFlux.execute(tiny_flux_patcher(), "default", "sometimes")


def test_cache_folder_is_comfyuis_user_folder_unless_the_user_chose_one(tmp_path, monkeypatch):
    assert compile_cache_folder().startswith(folder_paths.get_user_directory())
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache_folder_for(str(tmp_path / "ours")) == str(tmp_path / "ours")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))
    assert compile_cache_folder_for(str(tmp_path / "ours")) == str(tmp_path / "users")


def test_the_packs_compile_settings_stay_out_of_the_rest_of_the_process(monkeypatch):
    """Dynamo's recompile limit and inductor's cache folder are what they were after Compile FLUX compiled
    and sampled: core's TorchCompileModel on another model compiles as it would without the pack (the
    RoPE decompositions excepted: the next test)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    limit = torch._dynamo.config.recompile_limit
    seen = {}

    def watch(executor, *args, **kwargs):
        seen["limit"] = torch._dynamo.config.recompile_limit
        return executor(*args, **kwargs)

    model = compiled(gpu_like_flux(hidden_size=144))
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", watch)
    ksample(model, steps=2)
    assert seen["limit"] == max(limit, RECOMPILE_LIMIT), "raised while the pack's model samples"
    assert torch._dynamo.config.recompile_limit == limit
    # Inductor writes its default folder into the variable itself, on first use.
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir())


def test_core_torch_compile_on_another_model_gives_what_it_gives_without_the_pack():
    """The pack's RoPE decompositions hold for the whole process (torch caches no compile given its own):
    core's TorchCompileModel compiles ComfyUI's RoPE through them, to the same values."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    model = gpu_like_flux(hidden_size=128)
    expected = ksample(model, steps=2)
    compiled(gpu_like_flux(hidden_size=144))
    assert torch.ops.comfy_kitchen.apply_rope.default in select_decomp_table()
    core = TorchCompileModel.execute(model, "inductor").result[0]
    assert relative_error(ksample(core, steps=2), expected) < FP32_ROUNDING


COMPILE_IN_A_FRESH_PROCESS = """
import json, sys
from tests.support import flux_fixtures
flux_fixtures.use_comfyui(sys.argv[2])
flux_fixtures.import_pack(sys.argv[1])
import torch
from test_compile import compiled
from tests.support.ksampler_helpers import gpu_like_flux, ksample
from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize
model = gpu_like_flux()
if sys.argv[3] == "fp8":
    model = FP8DynamicQuantize.execute(model, "per-row", "").result[0]
if sys.argv[3] == "after-another-compile":
    torch.compile(lambda x: x.sin() + 1)(torch.ones(2))
ksample(compiled(model), steps=2)
from torch._inductor.decomposition import select_decomp_table
rope_decomposed = torch.ops.comfy_kitchen.apply_rope.default in select_decomp_table()
print(json.dumps({**torch._dynamo.utils.counters["inductor"], "rope_decomposed": rope_decomposed}))
"""


@pytest.mark.parametrize("weights", ["float", "fp8"])
def test_a_second_process_finds_the_compiled_graphs_on_disk(tmp_path, weights):
    """Also with FP8 Dynamic Quantize's weights, which are graph inputs of a tensor subclass."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile-cache")}

    cold = compile_in_a_fresh_process(tmp_path, env, weights)
    warm = compile_in_a_fresh_process(tmp_path, env, weights)
    assert cold.get("fxgraph_cache_miss", 0) > 0
    # The warm process compiles nothing anew (on GPUs it finds more graphs than the cold one built: those the
    # cold one found again itself after building them).
    assert warm.get("fxgraph_cache_miss", 0) == 0 and warm.get("fxgraph_cache_hit", 0) >= cold["fxgraph_cache_miss"]


def compile_in_a_fresh_process(cwd, env, variant):
    """Inductor's counters after a 2-step sample with Compile FLUX in a new Python process."""
    # The process imports the tests' support package from the repository and this module from tests/.
    search_path = [PACK_DIR, os.path.join(PACK_DIR, "tests"), *filter(None, [env.get("PYTHONPATH")])]
    env = {**env, "PYTHONPATH": os.pathsep.join(search_path)}
    result = subprocess.run([sys.executable, "-c", COMPILE_IN_A_FRESH_PROCESS, PACK_DIR, COMFYUI_DIR, variant],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compiles_after_another_torch_compile_in_the_process(tmp_path):
    """Core's TorchCompileModel or another pack may compile first, and inductor then copies its
    decomposition table: RoPE decompositions registered into it later were missing from the copy (torch
    2.11 failed every Compile FLUX graph on them, torch 2.14 left them unfused)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile-cache")}
    counters = compile_in_a_fresh_process(tmp_path, env, "after-another-compile")
    assert counters.get("fxgraph_cache_miss", 0) > 1
    assert counters["rope_decomposed"], "inductor compiled FLUX with a decomposition table lacking the RoPE ops"


def test_comfyuis_rope_op_reaches_inductor_as_plain_ops_with_the_same_result():
    compiled(gpu_like_flux())
    query, key = torch.randn(2, 1, 3, 5, 8).unbind(0)
    freqs_cis = torch.randn(1, 1, 5, 4, 2, 2)
    graph = make_fx(comfy.quant_ops.ck.apply_rope, decomposition_table=select_decomp_table())(query, key, freqs_cis)
    assert "comfy_kitchen" not in graph.code
    for actual, expected in zip(graph(query, key, freqs_cis), comfy.quant_ops.ck.apply_rope(query, key, freqs_cis)):
        torch.testing.assert_close(actual, expected)


def launched_one_by_one(model):
    return CompileFlux.execute(model, "default", "automatic", False).result[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's report")
def test_on_the_cpu_the_report_says_cuda_graphs_are_not_used(caplog_info):
    ksample(compiled(gpu_like_flux()), steps=2)
    assert cuda_graph_reports(caplog_info)[-1] == "CUDA graphs not used: the model runs on cpu, not on a CUDA GPU"


def test_cuda_graphs_off_takes_the_replay_off_a_compiled_model():
    model = launched_one_by_one(compiled(gpu_like_flux()))
    assert CUDA_GRAPHS_KEY not in model.model_options
    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CUDA_GRAPHS_KEY)


@needs_cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_replayed_runs_give_the_launched_runs_latents_bit_for_bit(fp8, caplog_info):
    model = gpu_like_flux(dtype=torch.bfloat16)
    model = FP8DynamicQuantize.execute(model, "per-row", "").result[0] if fp8 else model
    launched = ksample(launched_one_by_one(model), steps=6)
    replaying = compiled(model)
    assert torch.equal(ksample(replaying, steps=6), launched)
    assert torch.equal(ksample(replaying, steps=6), launched)
    assert cuda_graph_reports(caplog_info)[-2:] == ["4 of 6 model calls replayed from CUDA graphs (1 captured)",
                                                    "6 of 6 model calls replayed from CUDA graphs (0 captured)"]


@needs_cuda
def test_a_lora_or_size_change_is_captured_anew(caplog_info):
    model = gpu_like_flux(dtype=torch.bfloat16)
    lora, replaying = tiny_lora(model), compiled(model)
    for strength, size in ((0.5, 32), (1.0, 32), (1.0, 48), (0.5, 32)):
        expected = ksample(launched_one_by_one(with_lora(model, lora, strength)), size=size, steps=4)
        assert torch.equal(ksample(with_lora(replaying, lora, strength), size=size, steps=4), expected)
    assert cuda_graph_reports(caplog_info)[-1].startswith("2 of 4 model calls replayed"), \
        "LoRA weights merged anew for the last run: new addresses, a new capture"


# The cache nodes as the GPU tests stack them: First Block Cache, and Block Cache with Taylor order 2
# predictions, two probe blocks and a tail from the single blocks.
CACHES = {
    "first-block-cache": ("First Block Cache", lambda model: with_cache(model, 0.8)),
    "block-cache": ("Block Cache", lambda model: with_block_cache(model, 0.8, 2, probe_blocks=2, tail_blocks=1)),
}


@needs_cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("conds", ["batched", "one call each"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_the_caches_replay_their_graph_segments_as_launched_bit_for_bit(fp8, conds, cache, caplog_info, monkeypatch):
    """The CPU tests of test_graph_segments.py on CUDA graphs, with the blocks compiled."""
    name, cached = CACHES[cache]
    model = gpu_like_flux(dtype=torch.bfloat16)
    if conds == "one call each":
        no_room_to_batch(monkeypatch)
    model = FP8DynamicQuantize.execute(model, "per-row", "").result[0] if fp8 else model
    _, _, reused = assert_replays_as_launched(cached(launched_one_by_one(model)), cached(compiled(model)), caplog_info,
                                              steps=8, cfg=2.0)
    assert 0 < reused < 8
    calls = 8 if conds == "batched" else 16
    assert cuda_graph_reports(caplog_info)[-1].startswith(
        f"{calls} of {calls} model calls replayed from CUDA graphs ({3 * calls} graph segments, split where {name} "
        "decides")


@needs_cuda
def test_graphs_stay_while_the_model_stays_loaded_and_go_when_it_is_unloaded():
    replaying = compiled(gpu_like_flux(dtype=torch.bfloat16))
    ksample(replaying, steps=3)
    graphs = replaying.model_options[CUDA_GRAPHS_KEY].graphs.calls.captured
    assert len(graphs) == 1
    ksample(replaying, steps=3, seed=1)
    assert len(graphs) == 1, "a second run on the loaded model replays the same graph"
    comfy.model_management.unload_all_models()
    assert not graphs
