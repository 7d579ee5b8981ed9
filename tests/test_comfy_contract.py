"""The ComfyUI details the pack relies on (nodes/comfy_contract.py): a canary per touchpoint, so that a
ComfyUI update fails the test that names what changed; what the real ComfyUI does at each one; and a
changed detail disabling the nodes that need it with one line, instead of a crash mid-sampling."""
import logging
import re

import pytest
import torch

import comfy.patcher_extension
import comfy.samplers
from fluxaccel.nodes import comfy_contract
from fluxaccel.nodes.compile import CompileFlux
from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize
from tests.support.flux_fixtures import tiny_flux_patcher
from tests.support.ksampler_helpers import conditioning, ksample, with_block_cache, with_cache


@pytest.fixture(autouse=True)
def checked_anew():
    """Every test sees this ComfyUI's touchpoints checked afresh (and leaves no patched result behind)."""
    comfy_contract.problems.cache_clear()
    yield
    comfy_contract.problems.cache_clear()


@pytest.mark.parametrize("touchpoint", comfy_contract.TOUCHPOINTS, ids=lambda touchpoint: touchpoint.name)
def test_touchpoint_holds(touchpoint):
    assert touchpoint.check() is None, f"{touchpoint.what}: {touchpoint.check()}"


def test_the_touchpoints_name_the_packs_real_nodes():
    from fluxaccel.nodes import attention, compile, first_block_cache, fp8_quantize
    from fluxaccel.nodes.context_parallel import node as context_parallel

    names = {attention.NODE_NAME, compile.NODE_NAME, context_parallel.NODE_NAME, first_block_cache.NODE_NAME,
             first_block_cache.BLOCK_CACHE_NODE_NAME, fp8_quantize.NODE_NAME}
    assert names == set(comfy_contract.ALL_NODES)
    assert {node for touchpoint in comfy_contract.TOUCHPOINTS for node in touchpoint.needed_by} <= names


def test_no_node_is_disabled_on_this_comfyui():
    assert comfy_contract.problems() == {} and comfy_contract.node_problems() == {}


class Recorder:
    """A wrapper (any kind) that keeps what ComfyUI called it with, read through the contract."""

    def __init__(self, read):
        self.read, self.calls = read, []

    def __call__(self, executor, *args, **kwargs):
        self.calls.append(self.read(executor, args, kwargs))
        return executor(*args, **kwargs)


def sampled_with(wrapper_type, recorder, family="flux1"):
    model = tiny_flux_patcher(family=family).clone()
    model.add_wrapper_with_key(wrapper_type, "test", recorder)
    ksample(model, steps=2)
    return recorder.calls


@pytest.mark.parametrize("family", ["flux1", "flux2", "chroma"])
def test_forward_inputs_are_read_by_name_and_called_back_as_comfyui_does(family):
    def read(executor, args, kwargs):
        inputs, options = comfy_contract.forward_inputs(executor.class_obj, args, kwargs)
        call_args, call_kwargs = comfy_contract.forward_call(executor.class_obj, inputs, options)
        assert (call_args, call_kwargs) == (list(args), kwargs)
        return inputs, options

    (inputs, options), *_ = sampled_with(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, Recorder(read), family)
    assert list(inputs)[:3] == ["x", "timestep", "context"] and inputs["x"].ndim == 4
    assert isinstance(options, dict) and "cond_or_uncond" in options


def test_calc_cond_batch_arguments_are_read_by_name():
    calls = sampled_with(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH,
                         Recorder(lambda executor, args, kwargs: comfy_contract.calc_cond_batch_arguments(args, kwargs)))
    arguments = calls[0]
    assert torch.is_tensor(arguments["timestep"]) and "transformer_options" in arguments["model_options"]
    assert arguments["x_in"].shape == (1, 16, 4, 4)


def test_outer_sample_arguments_are_read_by_name():
    calls = sampled_with(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
                         Recorder(lambda executor, args, kwargs: comfy_contract.outer_sample_arguments(args, kwargs)))
    assert calls[0]["noise"].shape == (1, 16, 4, 4) and calls[0]["sigmas"].shape == (3,)


def test_the_guider_holds_the_runs_model_conds_while_it_samples():
    def read(executor, args, kwargs):
        guider = args[0]
        return {name: [sorted(cond["model_conds"]) for cond in conds]
                for name, conds in comfy_contract.guider_conds(guider).items()}

    calls = sampled_with(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, Recorder(read))
    assert "c_crossattn" in calls[0]["positive"][0] and "guidance" in calls[0]["positive"][0]


@pytest.mark.parametrize("family", ["flux1", "flux2", "chroma"])
def test_the_blocks_are_called_through_dit_patches_with_what_the_pack_reads(family):
    seen = {}

    def replacement(args, extra):
        options = args["transformer_options"]
        seen[(options["block_type"], options["block_index"])] = sorted(args)
        return extra["original_block"](args)

    model = tiny_flux_patcher(family=family).clone()
    for kind, count in (("double", 2), ("single", 3)):
        for index in range(count):
            model.set_model_patch_replace(replacement, "dit", f"{kind}_block", index)
    ksample(model, steps=1)
    assert set(seen) == {("double", 0), ("double", 1), ("single", 0), ("single", 1), ("single", 2)}
    assert seen[("double", 0)] == ["attn_mask", "img", "pe", "transformer_options", "txt", "vec"]
    assert seen[("single", 0)] == ["attn_mask", "img", "pe", "transformer_options", "vec"]


def test_a_changed_detail_disables_the_nodes_that_need_it_with_one_line(monkeypatch, caplog):
    """A fake ComfyUI difference: `_calc_cond_batch` takes its arguments under other names."""
    def calc_cond_batch(model, conditionings, x, t, options):
        raise AssertionError("never called: the node refuses first")

    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", calc_cond_batch)
    model = tiny_flux_patcher()
    with pytest.raises(ValueError) as refused:
        with_cache(model, 0.1)
    assert re.fullmatch(
        rf"Apply First Block Cache is disabled on ComfyUI {re.escape(comfy_contract.comfyui_version())}: "
        r"samplers._calc_cond_batch's arguments changed \(\S*calc_cond_batch\(model, conditionings, x, t, options\) "
        r"lacks conds, x_in, timestep, model_options\). Update comfyui-fluxaccel, or use the ComfyUI version its "
        r"README names.", str(refused.value)), refused.value
    with pytest.raises(ValueError, match="^Apply Block Cache is disabled"):
        with_block_cache(model, 0.1)
    # The nodes that do not need it still run.
    FP8DynamicQuantize.execute(model, "per-row", "")
    CompileFlux.execute(model, "default", "automatic")
    with caplog.at_level(logging.WARNING):
        comfy_contract.report_at_load()
    assert [record.getMessage() for record in caplog.records] == [
        f"comfyui-fluxaccel: {comfy_contract.node_problems()[node]}"
        for node in sorted((comfy_contract.BLOCK_CACHE, comfy_contract.FIRST_BLOCK_CACHE))]


def test_a_missing_optimisation_is_said_once_and_the_nodes_run(monkeypatch, caplog):
    monkeypatch.setattr(comfy_contract, "kitchen_rope_ops", lambda: None)
    with caplog.at_level(logging.WARNING):
        comfy_contract.report_at_load()
    assert [record.getMessage() for record in caplog.records] == [
        f"comfyui-fluxaccel on ComfyUI {comfy_contract.comfyui_version()}: Compile FLUX leaves ComfyUI's RoPE as it "
        "is (a kernel and host dispatch per block) (comfy_kitchen's apply_rope ops: torch.ops.comfy_kitchen has no "
        "apply_rope / apply_rope1)"]
    assert comfy_contract.node_problems() == {}
    positive = conditioning(seed=1)
    assert torch.isfinite(ksample(CompileFlux.execute(tiny_flux_patcher(), "default", "automatic").result[0],
                                  positive, steps=1)).all()


def test_a_comfyui_without_chroma_disables_nothing(monkeypatch):
    """Chroma is one model more where ComfyUI has it: without it the nodes take the FLUX models alone."""
    def no_chroma():
        raise ImportError("No module named 'comfy.ldm.chroma'")

    monkeypatch.setattr(comfy_contract, "chroma_class", no_chroma)
    assert comfy_contract.problems() == {}
    assert comfy_contract.model_classes(comfy_contract.flux_class, comfy_contract.chroma_class) == (
        comfy_contract.flux_class(),)
