"""The pack imports outside ComfyUI, registers through V3 only, and keeps kernels free of ComfyUI."""
import ast
import os
import subprocess
import sys

from conftest import PACK_DIR

IMPORT_OUTSIDE_COMFYUI = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pack", sys.argv[1] + "/__init__.py", submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
import pack.kernels.first_block_cache
import pack.kernels.regional_compile
assert callable(pack.comfy_entrypoint)
assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "ComfyUI would take V1 mappings and ignore comfy_entrypoint"
assert not [name for name in sys.modules if name.split(".")[0] in ("comfy", "comfy_api", "nodes")]
print("ok")
"""


def test_pack_and_kernels_import_without_comfyui(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", IMPORT_OUTSIDE_COMFYUI, PACK_DIR], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def imported_modules(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_kernels_never_import_comfyui():
    kernels_dir = os.path.join(PACK_DIR, "kernels")
    for filename in os.listdir(kernels_dir):
        if filename.endswith(".py"):
            roots = {name.split(".")[0] for name in imported_modules(os.path.join(kernels_dir, filename))}
            assert not roots & {"comfy", "comfy_api", "comfy_execution", "nodes", "server", "folder_paths"}, filename
