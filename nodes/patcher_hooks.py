"""Attaching the pack's behaviour to a cloned ModelPatcher through ComfyUI's wrappers."""
import logging


def set_wrapper(model_patcher, wrapper_type, key, wrapper):
    """Adds `wrapper` under `key`, replacing one an earlier application of the same node left there."""
    model_patcher.remove_wrappers_with_key(wrapper_type, key)
    model_patcher.add_wrapper_with_key(wrapper_type, key, wrapper)


def non_dynamic_clone(model, node_name):
    """A clone loaded by ComfyUI's regular loader, which puts whole weights in place at load.

    ComfyUI's DynamicVRAM patcher streams weights per call instead; the clone moves the model to
    ComfyUI's own non-dynamic delegate (re-read from its file)."""
    if not model.is_dynamic():
        return model.clone()
    try:
        patched = model.clone(disable_dynamic=True)
    except RuntimeError as error:
        raise ValueError(f"{node_name} cannot take this model off DynamicVRAM ({error}). Load it with Load "
                         "Diffusion Model, or start ComfyUI with --disable-dynamic-vram.") from error
    logging.info("%s: the model leaves DynamicVRAM for ComfyUI's regular loader.", node_name)
    return patched
