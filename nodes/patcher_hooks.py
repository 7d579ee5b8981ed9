"""Attaching the pack's behaviour to a cloned ModelPatcher through ComfyUI's wrappers."""


def set_wrapper(model_patcher, wrapper_type, key, wrapper):
    """Adds `wrapper` under `key`, replacing one an earlier application of the same node left there."""
    model_patcher.remove_wrappers_with_key(wrapper_type, key)
    model_patcher.add_wrapper_with_key(wrapper_type, key, wrapper)
