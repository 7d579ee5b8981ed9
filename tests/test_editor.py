"""The shipped graph-editor workflows in ComfyUI's real frontend, served by the real server, in headless Chromium."""
import pytest
from PIL import Image

from tests.support.api_workflows import api_with_test_models
from tests.support.browser import HeadlessChromium
from tests.support.ui_workflows import (editor_graph_with_test_models, errors_shown, load_editor_graph, open_editor,
                                        read_workflow, without_titles, workflow_names)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def editor(comfy_server):
    with HeadlessChromium() as browser:
        open_editor(browser, comfy_server)
        yield browser


@pytest.mark.parametrize("name", workflow_names())
def test_editor_loads_the_workflow_without_errors_and_makes_its_api_twin(editor, name, tmp_path):
    """On a host with the workflow's model files (here: the test models under the same loaders)."""
    graph = editor_graph_with_test_models(read_workflow(name, api=False))
    loaded = load_editor_graph(editor, graph, name)
    assert loaded["unknown"] == [], "node types the editor does not know (missing nodes)"
    assert loaded["nodes"] == len(graph["nodes"])
    assert errors_shown(editor) == []
    assert without_titles(loaded["output"]) == api_with_test_models(read_workflow(name, api=True))
    editor.screenshot(tmp_path / "editor.png")
    with Image.open(tmp_path / "editor.png") as png:
        assert png.size[0] == 1600, "the editor page, as wide as the window"


def test_the_editor_checks_catch_missing_nodes_and_files(editor):
    name = "flux1-dev-fp8-compile-first-block-cache"
    graph = read_workflow(name, api=False)
    assert sorted(errors_shown_after_loading(editor, graph, name)) == ["DualCLIPLoader", "UNETLoader", "VAELoader"], \
        "FLUX.1-dev's files are not on the test host"
    unknown_type = editor_graph_with_test_models(graph)
    next(node for node in unknown_type["nodes"] if node["type"] == "FluxAccelCompile")["type"] = "NoSuchNode"
    assert load_editor_graph(editor, unknown_type, name)["unknown"] == ["NoSuchNode"]


def errors_shown_after_loading(editor, graph, name):
    load_editor_graph(editor, graph, name)
    return errors_shown(editor)
