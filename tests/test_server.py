"""End to end through the real ComfyUI server: /object_info, /prompt, /history, the websocket."""
import os

import pytest
from PIL import Image

from api_workflows import text_to_image
from comfy_server import PromptFailed
from conftest import COMFYUI_DIR

pytestmark = pytest.mark.server

FBC_NODE = ("FluxAccelFirstBlockCache",
            {"residual_diff_threshold": 0.5, "start_percent": 0.0, "end_percent": 1.0, "max_consecutive_hits": 0})


def test_object_info_lists_the_pack_under_one_category(comfy_server):
    info = comfy_server.get("/object_info")
    node = info["FluxAccelFirstBlockCache"]
    assert node["category"] == "FLUX acceleration"
    assert node["display_name"] == "Apply First Block Cache"
    assert "comfyui-fluxaccel" in node["python_module"]
    assert all(spec[1].get("tooltip") for spec in node["input"]["required"].values())


def test_text_to_image_through_the_real_loaders(comfy_server):
    entry = comfy_server.run(text_to_image(output="image", steps=3))
    [image] = entry["outputs"]["save"]["images"]
    with Image.open(os.path.join(COMFYUI_DIR, "output", image["subfolder"], image["filename"])) as png:
        assert png.size == (128, 128)


def test_first_block_cache_reports_on_the_sampler_node(comfy_server):
    _, texts = comfy_server.run_showing_node_texts(text_to_image([FBC_NODE], steps=6, seed=7))
    [report] = texts["sampler"]
    assert report.startswith("First Block Cache (threshold 0.5): computed ")
    assert "/6 steps" in report
    assert report in comfy_server.log()


def test_bad_window_fails_validation_and_the_server_stays_up(comfy_server):
    bad = (FBC_NODE[0], {**FBC_NODE[1], "start_percent": 0.8, "end_percent": 0.2})
    with pytest.raises(PromptFailed, match="must not be greater than end_percent"):
        comfy_server.queue(text_to_image([bad]))
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"] == "0.30.0"
