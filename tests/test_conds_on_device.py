"""The conditioning moved to the model's device once per sampling run (ComfyUI's real conds, guider, KSampler).

On a GPU this removes the per-step copy from pageable CPU memory that made every step wait for the
previous one (measured in docs/LAB-NOTEBOOK.md); the CPU has one device, so here the tests check what
is moved where, that sampling gives the same result and that the run's own conds are put back.
"""
import pytest
import torch

import comfy.conds
import comfy.patcher_extension
import comfy.samplers
from tests.support.flux_fixtures import tiny_flux_patcher
from fluxaccel.nodes import patcher_hooks
from fluxaccel.nodes.attention import FluxAttentionBackend
from fluxaccel.nodes.compile import CompileFlux
from fluxaccel.nodes.fp8_quantize import FP8DynamicQuantize
from tests.support.ksampler_helpers import ksample, with_cache

# A device no tensor of the test starts on; moving to it keeps shapes and dtypes and allocates nothing.
OTHER_DEVICE = torch.device("meta")

SPEED_NODES = {
    "FLUX Attention Backend": lambda model: FluxAttentionBackend.execute(model, "auto").result[0],
    "Compile FLUX": lambda model: CompileFlux.execute(model, "default", "automatic").result[0],
    "FP8 Dynamic Quantize": lambda model: FP8DynamicQuantize.execute(model, "per-row", "").result[0],
    "First Block Cache": lambda model: with_cache(model, 0.12),
}


def processed_conds():
    """Conds as ComfyUI's process_conds leaves them: {name: [cond dict with its model conds]}."""
    control = object()
    cond = {
        "model_conds": {
            "c_crossattn": comfy.conds.CONDCrossAttn(torch.randn(1, 6, 32)),
            "y": comfy.conds.CONDRegular(torch.randn(1, 32)),
            "guidance": comfy.conds.CONDRegular(torch.FloatTensor([3.5])),
            "ref_latents": comfy.conds.CONDList([torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2)]),
            "constant": comfy.conds.CONDConstant("a setting"),
        },
        "control": control,
        "uuid": "positive-0",
    }
    return {"positive": [cond], "negative": [dict(cond, uuid="negative-0")]}


def sampler_sample_wrappers(model):
    return model.wrappers.get(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, {})


def test_model_conds_move_and_everything_else_is_shared():
    conds = processed_conds()
    moved = patcher_hooks.conds_on_device(conds, OTHER_DEVICE)
    assert moved.keys() == conds.keys()
    for name in conds:
        (original,), (copy,) = conds[name], moved[name]
        assert copy["control"] is original["control"] and copy["uuid"] == original["uuid"]
        for key in ("c_crossattn", "y", "guidance"):
            before, after = original["model_conds"][key], copy["model_conds"][key]
            assert type(after) is type(before) and after.cond.device == OTHER_DEVICE
            assert after.cond.shape == before.cond.shape and after.cond.dtype == before.cond.dtype
            assert before.cond.device.type == "cpu"
        assert [t.device for t in copy["model_conds"]["ref_latents"].cond] == [OTHER_DEVICE] * 2
        assert copy["model_conds"]["constant"] is original["model_conds"]["constant"]


def test_conds_already_on_the_device_are_left_as_they_are():
    conds = processed_conds()
    moved = patcher_hooks.conds_on_device(conds, torch.device("cpu"))
    for name in conds:
        for key, value in conds[name][0]["model_conds"].items():
            assert moved[name][0]["model_conds"][key] is value


def test_the_sampler_sees_moved_conds_and_the_run_gets_its_own_back():
    guider = comfy.samplers.CFGGuider(tiny_flux_patcher())
    guider.model_patcher.load_device = OTHER_DEVICE
    guider.conds = conds = processed_conds()
    seen = []

    def sampler(guider, *args):
        seen.append((guider.conds, args))
        return "samples"

    assert patcher_hooks.sample_with_conds_on_device(sampler, guider, "sigmas", "extra_args") == "samples"
    (during, args), = seen
    assert args == ("sigmas", "extra_args")
    assert during["positive"][0]["model_conds"]["c_crossattn"].cond.device == OTHER_DEVICE
    assert guider.conds is conds


def test_the_run_gets_its_own_conds_back_when_sampling_fails():
    guider = comfy.samplers.CFGGuider(tiny_flux_patcher())
    guider.conds = conds = processed_conds()

    def failing_sampler(guider, *args):
        raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        patcher_hooks.sample_with_conds_on_device(failing_sampler, guider)
    assert guider.conds is conds


@pytest.mark.parametrize("apply_node", SPEED_NODES.values(), ids=SPEED_NODES.keys())
def test_every_speed_node_installs_it_once(apply_node):
    once = apply_node(tiny_flux_patcher())
    twice = apply_node(once)
    for model in (once, twice):
        assert sampler_sample_wrappers(model) == {
            patcher_hooks.CONDS_ON_DEVICE_KEY: [patcher_hooks.sample_with_conds_on_device]}


def test_ksampler_runs_it_with_the_models_device_and_samples_the_same(monkeypatch):
    model = tiny_flux_patcher()
    expected = ksample(model)
    devices = []
    move = patcher_hooks.conds_on_device

    def recording_move(conds, device):
        devices.append(device)
        return move(conds, device)

    monkeypatch.setattr(patcher_hooks, "conds_on_device", recording_move)
    actual = ksample(SPEED_NODES["FLUX Attention Backend"](model))
    assert devices == [model.load_device]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
