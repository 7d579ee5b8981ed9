"""Speed features under Compile FLUX's CUDA-graph replay, through ComfyUI's real ModelPatcher and KSampler.

First Block Cache splits each captured forward where it decides (kernels/compile/cuda_graphs.py). On the CPU the
graphs are the eager stand-in of tests/support/graph_stand_in.py, which replays the recorded ATen operations on
the recorded tensors, runs none of the forward's host code and starts every replayed call with NaN in
the graphs' memory: a residual or decision the segments do not hand over, or a residual left in graph
memory for a later call, shows as a different latent. Compile FLUX's blocks run uncompiled here (the stand-in cannot
see inside inductor's kernels); every replayed run is compared bit for bit with the same chain launched.
The same checks on CUDA graphs are GPU tests in test_compile.py and test_context_parallel.py.
"""
import pytest
import torch

from fluxaccel.nodes.context_parallel import pool as context_parallel_pool
from fluxaccel.nodes.compile import CUDA_GRAPHS_KEY, CompileFlux, use_cuda_graphs
from fluxaccel.nodes.context_parallel.node import ContextParallel
from fluxaccel.nodes.first_block_cache import COMPUTE, REUSE
from conftest import cpu_machine_only
from tests.support.graph_stand_in import TapeRecorder
from tests.support.ksampler_helpers import (assert_replays_as_launched, cache_summaries, conditioning, gpu_like_flux,
                                            ksample, no_room_to_batch, tiny_lora, with_block_cache, with_cache,
                                            with_lora)
from test_compile import cuda_graph_reports, launched_one_by_one as launched, recording_blocks

# Where ComfyUI runs on a GPU the tiny models sample there, where the stand-in records nothing (it records
# CPU tensors): test_compile.py and test_context_parallel.py replay real CUDA graphs there instead.
pytestmark = cpu_machine_only

REUSING_THRESHOLD = 0.8


def graphs_of(model, recorder):
    """`model` under Compile FLUX with CUDA graphs recorded by `recorder`."""
    compiled = CompileFlux.execute(model, "default", "automatic").result[0]
    use_cuda_graphs(compiled, True, recorder)
    return compiled


@pytest.fixture(autouse=True)
def blocks_run_uncompiled():
    with torch.compiler.set_stance("force_eager"):
        yield


def split_conds():
    """Cond and uncond of different text lengths: ComfyUI evaluates each in a call of its own."""
    return conditioning(tokens=6, seed=1), conditioning(tokens=9, seed=2)


def test_segments_replay_the_launched_cached_run_bit_for_bit(caplog_info):
    model, recorder = gpu_like_flux(), TapeRecorder()
    replaying = with_cache(graphs_of(model, recorder), REUSING_THRESHOLD)
    _, _, reused = assert_replays_as_launched(with_cache(launched(model), REUSING_THRESHOLD), replaying, caplog_info,
                                              steps=8)
    assert 0 < reused < 8, "some steps reused, some computed"
    first, second = cuda_graph_reports(caplog_info)[-2:]
    assert first == ("6 of 8 model calls replayed from CUDA graphs (18 graph segments, split where First Block Cache "
                     "decides; 1 call captured, in 4 segments)")
    assert second.startswith("8 of 8 model calls replayed from CUDA graphs (24 graph segments")
    assert recorder.replays == 6 * 3 + 8 * 3


@pytest.mark.parametrize("conds, calls", [("batched", 8), ("one call each", 16), ("text lengths differ", 16),
                                          ("two prompts, one call each", 24)])
def test_each_conditioning_keeps_its_own_residuals(conds, calls, caplog_info, monkeypatch):
    model = gpu_like_flux()
    if "one call each" in conds:
        # As on a GPU short of memory: ComfyUI finds no room to batch conditionings and runs one call for
        # each. Two prompts combined (Conditioning Combine) are two calls of equal shapes, both positive:
        # they must not share the residuals their captured forward keeps.
        no_room_to_batch(monkeypatch)
    positive, negative = split_conds() if conds == "text lengths differ" else (conditioning(seed=1), conditioning(seed=2))
    if conds.startswith("two prompts"):
        positive = positive + conditioning(seed=3)
    _, _, reused = assert_replays_as_launched(
        with_cache(launched(model), REUSING_THRESHOLD), with_cache(graphs_of(model, TapeRecorder()), REUSING_THRESHOLD),
        caplog_info, positive=positive, negative=negative, cfg=3.0, steps=8)
    assert 0 < reused < 8
    assert cuda_graph_reports(caplog_info)[-1].startswith(f"{calls} of {calls} model calls replayed")


@pytest.mark.parametrize("window", [dict(start_percent=0.3, end_percent=0.8), dict(max_consecutive_hits=1),
                                    dict(start_percent=0.5, max_consecutive_hits=2)])
def test_cache_window_and_hit_limit_keep_their_meaning(window, caplog_info):
    model = gpu_like_flux()
    assert_replays_as_launched(with_cache(launched(model), 100.0, **window),
                               with_cache(graphs_of(model, TapeRecorder()), 100.0, **window), caplog_info, steps=10)
    assert cuda_graph_reports(caplog_info)[-1].startswith("10 of 10 model calls replayed")


@pytest.mark.parametrize("order, probe_blocks, tail_blocks, every_n_steps", [
    (1, 1, 0, 0), (2, 2, 1, 0), (2, 1, 3, 0), (1, 3, 1, 0), (2, 1, 0, 2)])
@pytest.mark.parametrize("conds", ["batched", "one call each"])
def test_block_cache_replays_the_launched_run_bit_for_bit(order, probe_blocks, tail_blocks, every_n_steps, conds,
                                                          caplog_info, monkeypatch):
    """Taylor predictions (their coefficients filled in by the host between graphs), probe blocks ending in
    a double or a single block, tails starting in either, and the fixed schedule."""
    model = gpu_like_flux()
    if conds == "one call each":
        no_room_to_batch(monkeypatch)

    def cached(stack):
        return with_block_cache(stack, 0.5, order, probe_blocks=probe_blocks, tail_blocks=tail_blocks,
                                every_n_steps=every_n_steps)

    _, _, reused = assert_replays_as_launched(cached(launched(model)), cached(graphs_of(model, TapeRecorder())),
                                              caplog_info, steps=10, cfg=2.0)
    assert 0 < reused < 10
    calls = 10 if conds == "batched" else 20
    assert cuda_graph_reports(caplog_info)[-1].startswith(
        f"{calls} of {calls} model calls replayed from CUDA graphs ({3 * calls} graph segments, split where Block Cache "
        "decides")


def test_zero_threshold_replays_the_uncached_model_bit_for_bit():
    model = gpu_like_flux()
    expected = ksample(launched(model), cfg=2.0)
    assert torch.equal(ksample(with_cache(graphs_of(model, TapeRecorder()), 0.0), cfg=2.0), expected)
    assert torch.equal(ksample(graphs_of(model, TapeRecorder()), cfg=2.0), expected)


def test_a_lora_change_or_a_size_change_captures_anew(caplog_info):
    model = gpu_like_flux()
    lora = tiny_lora(model)
    replaying = with_cache(graphs_of(model, TapeRecorder()), REUSING_THRESHOLD)
    for strength, size in ((0.5, 32), (1.0, 32), (1.0, 48)):
        expected = ksample(with_lora(with_cache(launched(model), REUSING_THRESHOLD), lora, strength), size=size, steps=6)
        expected_steps = cache_summaries(caplog_info)[-1]
        patched = with_lora(replaying, lora, strength)
        for _ in range(2):
            assert torch.equal(ksample(patched, size=size, steps=6), expected), (strength, size)
            assert cache_summaries(caplog_info)[-1] == expected_steps
        # Merged anew, a LoRA's weights have new addresses; a new size has new shapes: each a new capture.
        assert [report.split(" (")[0] for report in cuda_graph_reports(caplog_info)[-2:]] == [
            "4 of 6 model calls replayed from CUDA graphs", "6 of 6 model calls replayed from CUDA graphs"]


def test_other_nodes_block_patches_stay_launched_and_say_so(caplog_info):
    model = gpu_like_flux()
    for patched in (recording_blocks(model)[0], with_cache(recording_blocks(model)[0], REUSING_THRESHOLD)):
        expected = ksample(launched(patched), steps=4)
        assert torch.equal(ksample(graphs_of(patched, TapeRecorder()), steps=4), expected)
        assert cuda_graph_reports(caplog_info)[-1] == (
            "CUDA graphs not used: another node's block replacements (('double_block', 0), ('double_block', 1), "
            "('single_block', 0), ...) decide on the host at every step")


def test_segments_are_chosen_on_the_host_between_replays(monkeypatch):
    """What the first segment measured decides the next, read once per call where the step's decision
    needs it: the segment graphs ran, not the forward's host code."""
    from fluxaccel.nodes.first_block_cache import CapturedResiduals

    choices, choose = [], CapturedResiduals.choose
    def recorded_choice(self, options):
        choices.append(choose(self, options))
        return choices[-1]

    monkeypatch.setattr(CapturedResiduals, "choose", recorded_choice)
    replaying = with_cache(graphs_of(gpu_like_flux(), TapeRecorder()), REUSING_THRESHOLD)
    ksample(replaying, steps=8)
    ksample(replaying, steps=8)
    assert choices[-8:].count(REUSE) > 0 and choices[-8:].count(COMPUTE) > 0 and len(choices) == 6 + 8


def test_context_parallel_over_gloo_runs_launched_and_says_why(caplog_info):
    model = gpu_like_flux()
    cached = with_cache(model, REUSING_THRESHOLD)
    def across_two(model):
        return ContextParallel.execute(model, 2, 0, 1, 0, False, "this machine").result[0]

    expected = ksample(across_two(launched(cached)), steps=4)
    try:
        parallel = across_two(graphs_of(cached, TapeRecorder()))
        assert torch.equal(ksample(parallel, steps=4), expected)
    finally:
        context_parallel_pool.shutdown_pool()
    assert cuda_graph_reports(caplog_info)[-1] == (
        "CUDA graphs not used: Context Parallel (multi-GPU)'s ranks exchange tensors over gloo, which a CUDA graph "
        "cannot hold: every rank launches its share")
    assert CUDA_GRAPHS_KEY in parallel.model_options
