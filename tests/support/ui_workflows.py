"""The pack's workflows in ComfyUI's real graph editor (the frontend its server serves), in headless Chromium.

The graph-editor files `workflows/<name>.json` are made from their API-format twins
`workflows/<name>.api.json` by the frontend itself (its "load API workflow" path, then the graph's
own serialization, as "Save" writes it), so they are exactly what a user's editor produces:

    python -m tests.support.ui_workflows --comfyui .host/ComfyUI        # rewrites workflows/*.json, docs/images/

The tests load each graph-editor file back into the editor and check that every node type exists,
and that the editor turns it into its API twin.
"""
import argparse
import copy
import json
import os
import tempfile
import time

from tests.support.api_workflows import MODEL_FILE_INPUTS, model_files_named, stand_in_file
from tests.support.flux_fixtures import PACK_DIR

WORKFLOWS_DIR = os.path.join(PACK_DIR, "workflows")
DOC_IMAGES_DIR = os.path.join(PACK_DIR, "docs", "images")
API_SUFFIX = ".api.json"
# The editor's default for a seed widget is a new random seed after every run; a shared workflow
# should reproduce its picture.
SEED_CONTROL = "fixed"
EDITOR_READY = "window.app?.rootGraph && window.LiteGraph?.registered_node_types?.KSampler"
# First-start extras of the editor that would cover the graph (the template browser, the minimap),
# and the low-detail drawing (no text) it switches to when a whole workflow is zoomed to fit.
EDITOR_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                   "LiteGraph.Canvas.MinFontSizeForLOD": 0}


def workflow_names():
    return sorted(name[:-len(API_SUFFIX)] for name in os.listdir(WORKFLOWS_DIR) if name.endswith(API_SUFFIX))


def read_workflow(name, api):
    with open(os.path.join(WORKFLOWS_DIR, name + (API_SUFFIX if api else ".json"))) as f:
        return json.load(f)


def open_editor(browser, server):
    for setting, value in EDITOR_SETTINGS.items():
        server.post(f"/settings/{setting}", value)
    browser.navigate(server.url + "/")
    browser.wait_for(EDITOR_READY, timeout=120)


def editor_graph_with_test_models(graph):
    """The graph-editor workflow naming the test host's model files instead of the real models'."""
    graph = copy.deepcopy(graph)
    for node in graph["nodes"]:
        widget_names = [entry["name"] for entry in node.get("inputs", []) if "widget" in entry]
        for index, name in enumerate(widget_names):
            if (folder := MODEL_FILE_INPUTS.get((node["type"], name))) is not None:
                node["widgets_values"][index] = stand_in_file(folder, node["widgets_values"][index])
    return graph


def placeholder_model_paths(files, root):
    """An extra_model_paths.yaml over empty files with the workflows' model names, so the editor
    shows the graphs as a user with the models installed sees them (ComfyUI only lists the names)."""
    lines = ["fluxaccel_placeholders:", f"    base_path: {root}"]
    for folder, names in sorted(files.items()):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for name in names:
            open(os.path.join(root, folder, name), "w").close()
        lines.append(f"    {folder}: {folder}")
    path = os.path.join(root, "extra_model_paths.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def errors_shown(browser):
    """Node types of the nodes the editor marks as erroneous (red outline), after its checks ran."""
    return browser.evaluate("window.app.rootGraph.nodes.filter(node => node.has_errors).map(node => node.type)")


def api_to_editor_graph(browser, api_workflow, name):
    """The graph-editor JSON the frontend makes of an API-format workflow."""
    return browser.evaluate(f"""(async () => {{
        await window.app.loadApiJson({json.dumps(api_workflow)}, {json.dumps(name)});
        for (const node of window.app.rootGraph.nodes)
            for (const widget of node.widgets ?? [])
                if (widget.name === "control_after_generate") widget.value = {json.dumps(SEED_CONTROL)};
        return window.app.rootGraph.serialize();
    }})()""")


def load_editor_graph(browser, graph, name):
    """Loads a graph-editor JSON; returns {"unknown": node types the editor does not know, "output": the
    API prompt it makes of the graph, "nodes": how many nodes it shows}."""
    return browser.evaluate(f"""(async () => {{
        const graph = {json.dumps(graph)};
        const known = window.LiteGraph.registered_node_types;
        const unknown = graph.nodes.map(node => node.type).filter(type => !(type in known));
        await window.app.loadGraphData(graph, true, true, {json.dumps(name)});
        const prompt = await window.app.graphToPrompt();
        return {{unknown, output: prompt.output, nodes: window.app.rootGraph.nodes.length}};
    }})()""")


def without_titles(prompt):
    """An API prompt as the server reads it: the editor adds node titles under `_meta`."""
    return {node_id: {key: value for key, value in node.items() if key != "_meta"} for node_id, node in prompt.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.path.join(PACK_DIR, ".host", "ComfyUI"))
    parser.add_argument("--screenshot", default="flux1-dev-fp8-compile-first-block-cache",
                        help="the workflow whose editor view goes into docs/images/")
    args = parser.parse_args()
    from tests.support.browser import HeadlessChromium
    from tests.support.comfy_server import ComfyServer

    os.makedirs(DOC_IMAGES_DIR, exist_ok=True)
    names = workflow_names()
    with tempfile.TemporaryDirectory() as placeholders:
        model_paths = placeholder_model_paths(model_files_named(read_workflow(n, api=True) for n in names), placeholders)
        with ComfyServer(os.path.abspath(args.comfyui), extra_args=["--extra-model-paths-config", model_paths]) as server, \
                HeadlessChromium(width=2200, height=1100) as browser:
            open_editor(browser, server)
            for name in names:
                write_editor_graph(browser, name)
                if name == args.screenshot:
                    screenshot(browser, name)


def write_editor_graph(browser, name):
    graph = api_to_editor_graph(browser, read_workflow(name, api=True), name)
    with open(os.path.join(WORKFLOWS_DIR, name + ".json"), "w") as f:
        json.dump(graph, f, indent=1)
        f.write("\n")
    print(f"wrote workflows/{name}.json ({len(graph['nodes'])} nodes)")


def screenshot(browser, name):
    load_editor_graph(browser, read_workflow(name, api=False), name)
    browser.evaluate("window.app.canvas.fitViewToSelectionAnimated()")
    time.sleep(2)  # the zoom animation
    if errors := errors_shown(browser):
        raise RuntimeError(f"the editor marks nodes of {name} as erroneous: {errors}")
    path = os.path.join(DOC_IMAGES_DIR, f"{name}.png")
    browser.screenshot(path)
    print(f"wrote {os.path.relpath(path, PACK_DIR)}")


if __name__ == "__main__":
    main()
