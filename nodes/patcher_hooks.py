"""Attaching the pack's behaviour to a cloned ModelPatcher through ComfyUI's wrappers."""
import copy
import logging

import torch

import comfy.patcher_extension

from . import comfy_contract

CONDS_ON_DEVICE_KEY = "fluxaccel.conds_on_device"


def set_wrapper(model_patcher, wrapper_type, key, wrapper):
    """Adds `wrapper` under `key`, replacing one an earlier application of the same node left there."""
    model_patcher.remove_wrappers_with_key(wrapper_type, key)
    model_patcher.add_wrapper_with_key(wrapper_type, key, wrapper)


def set_callback(model_patcher, call_type, key, callback):
    """Adds `callback` under `key`, replacing one an earlier application of the same node left there."""
    model_patcher.remove_callbacks_with_key(call_type, key)
    model_patcher.add_callback_with_key(call_type, key, callback)


def non_dynamic_clone(model, node_name):
    """A clone loaded by ComfyUI's regular loader, which puts whole weights in place at load.

    ComfyUI's DynamicVRAM patcher streams weights per call instead; the clone moves the model to
    ComfyUI's own non-dynamic delegate (re-read from its file)."""
    if not comfy_contract.is_dynamic(model):
        return model.clone()
    try:
        patched = model.clone(disable_dynamic=True)
    except RuntimeError as error:
        raise ValueError(f"{node_name} cannot take this model off DynamicVRAM ({error}). Load it with Load "
                         "Diffusion Model, or start ComfyUI with --disable-dynamic-vram.") from error
    logging.info("%s: the model leaves DynamicVRAM for ComfyUI's regular loader.", node_name)
    return patched


def keep_conds_on_device(model_patcher):
    """Has each sampling run move its conditioning to the model's device once, before the first step.

    ComfyUI keeps conditioning (FLUX: the T5 context, the pooled vector, the guidance) in CPU memory
    and copies it to the GPU in every model call. A copy from pageable CPU memory waits for the GPU
    to finish all the work queued before it, so each step started with an empty GPU queue, idle
    while the host issued the step's first kernels. With the conditioning already on the device,
    ComfyUI's per-step cast is a no-op: 28 steps of compiled FP8 FLUX.1-dev on an H200 took 2.77 s,
    against 2.81-3.31 s before, depending on the host's speed (docs/LAB-NOTEBOOK.md).
    """
    set_wrapper(model_patcher, comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, CONDS_ON_DEVICE_KEY,
                sample_with_conds_on_device)


def sample_with_conds_on_device(executor, guider, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: samples with the run's conditioning on the load device, then puts back
    the run's own (which ComfyUI's clean-up after sampling reads)."""
    conds = comfy_contract.guider_conds(guider)
    comfy_contract.set_guider_conds(guider, conds_on_device(conds, guider.model_patcher.load_device))
    try:
        return executor(guider, *args, **kwargs)
    finally:
        comfy_contract.set_guider_conds(guider, conds)


def conds_on_device(conds, device):
    """A copy of a sampling run's processed conds ({name: [cond dict]}) whose model conds hold their
    tensors on `device`; everything else in each cond dict is shared with the original."""
    return {name: [dict(cond, model_conds={key: model_cond_on_device(value, device)
                                           for key, value in cond.get("model_conds", {}).items()})
                   for cond in cond_list]
            for name, cond_list in conds.items()}


def model_cond_on_device(model_cond, device):
    """A shallow copy of a ComfyUI COND object (CONDRegular and kin) with its tensor, or list of
    tensors, moved to `device`; the object itself when there is nothing to move."""
    value = getattr(model_cond, "cond", None)
    tensors = [value] if torch.is_tensor(value) else value if isinstance(value, list) else []
    if not tensors or not all(torch.is_tensor(item) for item in tensors) or all(item.device == device for item in tensors):
        return model_cond
    copied = copy.copy(model_cond)
    copied.cond = value.to(device) if torch.is_tensor(value) else [item.to(device) for item in value]
    return copied
