"""The pack imports outside ComfyUI, registers through V3 only, and keeps kernels free of ComfyUI."""
import ast
import os
import re
import subprocess
import sys
import tokenize
import tomllib

from conftest import PACK_DIR

IMPORT_OUTSIDE_COMFYUI = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pack", sys.argv[1] + "/__init__.py", submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec)
sys.modules["pack"] = pack
spec.loader.exec_module(pack)
import pack.kernels.residual_cache
import pack.kernels.compile.regional_compile
import pack.kernels.fp8
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


def python_files(folder):
    """The Python files under `folder` (subpackages included), as paths relative to it."""
    for directory, _, filenames in os.walk(os.path.join(PACK_DIR, folder)):
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                yield os.path.relpath(os.path.join(directory, filename), os.path.join(PACK_DIR, folder))


def test_kernels_never_import_comfyui():
    for filename in python_files("kernels"):
        roots = {name.split(".")[0] for name in imported_modules(os.path.join(PACK_DIR, "kernels", filename))}
        assert not roots & {"comfy", "comfy_api", "comfy_execution", "nodes", "server", "folder_paths"}, filename


def test_registry_metadata_is_complete():
    """What the Comfy Registry and ComfyUI Manager read from pyproject.toml, and the changelog of that version."""
    with open(os.path.join(PACK_DIR, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert os.path.isfile(os.path.join(PACK_DIR, project["license"]["file"]))
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    with open(os.path.join(PACK_DIR, "CHANGELOG.md")) as f:
        assert f"## {project['version']}" in f.read()
    with open(os.path.join(PACK_DIR, "LICENSE")) as f:
        head = f.read(200)
    assert "GNU GENERAL PUBLIC LICENSE" in head and "Version 3" in head, "ComfyUI's license, GPL-3.0"


def test_requirements_txt_and_pyproject_list_the_same_dependencies():
    """ComfyUI Manager installs requirements.txt; the Comfy Registry and pip read pyproject.toml."""
    with open(os.path.join(PACK_DIR, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    with open(os.path.join(PACK_DIR, "requirements.txt")) as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert sorted(listed) == sorted(declared)
    assert not [name for name in listed if re.match(r"(torch|torchvision|torchaudio|torchsde)\b", name)], \
        "ComfyUI Manager skips these: ComfyUI brings them"


# ComfyUI's extension points, which nodes/ may use directly; every other ComfyUI detail goes through
# nodes/comfy_contract.py, where each is a touchpoint with its canary test.
EXTENSION_POINT_MODULES = {"comfy_api.latest", "comfy_api.torch_helpers", "comfy.patcher_extension",
                           "comfy.model_management", "folder_paths", "server"}
COMFYUI_ROOTS = {"comfy", "comfy_api", "comfy_execution", "comfy_kitchen", "folder_paths", "nodes", "server"}
# Private details by the names through which code reaches them.
PRIVATE_DETAILS = re.compile(r"\._qdata|\._params|\._layout_cls|\.object_patches|\.patches\b(?!_)|\.conds\b"
                             r"|model_lowvram|current_weight_patches_uuid|cli_args|\.size = |comfy\.(utils|ldm|samplers"
                             r"|model_patcher|weight_adapter|quant_ops|cli_args)\b")


def test_nodes_reach_comfyuis_private_details_only_through_the_contract_module():
    for filename in python_files("nodes"):
        if filename == "comfy_contract.py":
            continue
        path = os.path.join(PACK_DIR, "nodes", filename)
        comfy_imports = {name for name in imported_modules(path) if name.split(".")[0] in COMFYUI_ROOTS}
        assert comfy_imports <= EXTENSION_POINT_MODULES, (filename, comfy_imports - EXTENSION_POINT_MODULES)
        code = code_without_strings(path).replace("comfy_contract.", "")
        found = [match.group(0) for match in PRIVATE_DETAILS.finditer(code)]
        assert not found, (filename, found)


def code_without_strings(path) -> str:
    """The file's code, its strings (docstrings, messages) and comments blanked."""
    with open(path, "rb") as f:
        tokens = [token._replace(string='""' if token.type == tokenize.STRING else "")
                  if token.type in (tokenize.STRING, tokenize.COMMENT) else token
                  for token in tokenize.tokenize(f.readline)]
    return tokenize.untokenize(tokens).decode()


# Inputs a user rarely changes, which the graph editor folds away as core's nodes do theirs.
EXPERT_INPUTS = {"FluxAccelCompile": {"mode", "dynamic_shapes"}, "FluxAccelContextParallel": {"port", "ranks"},
                 "FluxAccelFP8DynamicQuantize": {"exclude"},
                 "FluxAccelBlockCache": {"probe_blocks", "tail_blocks", "every_n_steps"}}


def test_expert_inputs_are_marked_advanced():
    from fluxaccel.nodes import compile, first_block_cache, fp8_quantize
    from fluxaccel.nodes.context_parallel import node as context_parallel

    schemas = {schema.node_id: schema for schema in (node.define_schema() for node in (
        compile.CompileFlux, context_parallel.ContextParallel, fp8_quantize.FP8DynamicQuantize,
        first_block_cache.ApplyBlockCache))}
    assert set(schemas) == set(EXPERT_INPUTS)
    for node_id, schema in schemas.items():
        advanced = {item.id for item in schema.inputs if item.advanced}
        assert advanced == EXPERT_INPUTS[node_id], node_id
