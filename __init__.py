"""comfyui-fluxaccel: ComfyUI nodes that make FLUX sampling faster without losing the picture.

ComfyUI reads `comfy_entrypoint` (V3 API). Nothing here imports ComfyUI at import time, so the
pack (and its `kernels`) import anywhere; each capability's module is imported when ComfyUI asks,
and one whose optional dependency is missing is skipped with a warning instead of taking the
others down.
"""
import importlib
import logging

CAPABILITY_MODULES = {
    "first_block_cache": "FirstBlockCacheExtension",
    "compile": "CompileExtension",
    "fp8_quantize": "FP8QuantizeExtension",
    "context_parallel.node": "ContextParallelExtension",
    "attention": "AttentionExtension",
}


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    # One line per node this ComfyUI version cannot run (it then refuses prompts with that line).
    importlib.import_module(".nodes.comfy_contract", __name__).report_at_load()
    extensions = []
    for module_name, extension_name in CAPABILITY_MODULES.items():
        try:
            module = importlib.import_module(f".nodes.{module_name}", __name__)
        except ImportError as error:
            logging.warning("comfyui-fluxaccel: %s nodes disabled: %s (pip install -r requirements.txt)", module_name, error)
            continue
        extensions.append(getattr(module, extension_name)())

    class FluxAccelExtension(ComfyExtension):
        async def get_node_list(self):
            nodes = []
            for extension in extensions:
                nodes.extend(await extension.get_node_list())
            return nodes

    return FluxAccelExtension()
