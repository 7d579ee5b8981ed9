"""Test session against the real ComfyUI host made by scripts/setup_host.sh.

The pack is imported under the name `fluxaccel` from this checkout (ComfyUI itself imports it from
the `custom_nodes/` link under its folder name); ComfyUI comes from COMFYUI_DIR.
"""
import logging
import os

import pytest
import torch

# Before ComfyUI's folder joins the path: ComfyUI has a `tests` package of its own.
from tests.support import flux_fixtures
from tests.support.flux_fixtures import PACK_DIR

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", os.path.join(PACK_DIR, ".host", "ComfyUI"))

if not os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
    raise pytest.UsageError(f"no ComfyUI at {COMFYUI_DIR}: run `bash scripts/setup_host.sh` first")
flux_fixtures.use_comfyui(COMFYUI_DIR)
flux_fixtures.import_pack(PACK_DIR)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
# Tests of what ComfyUI does on a machine without a GPU (CI's): where it has one, the model samples there.
cpu_machine_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour on a machine without a GPU")


@pytest.fixture(autouse=True)
def deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def caplog_info(caplog):
    """caplog recording from INFO up, where the pack's per-run reports are logged."""
    caplog.set_level(logging.INFO)
    return caplog


@pytest.fixture(scope="session")
def comfy_server():
    """The real ComfyUI server of the host, with this pack linked into custom_nodes/."""
    from tests.support.comfy_server import ComfyServer

    with ComfyServer(COMFYUI_DIR) as server:
        yield server
