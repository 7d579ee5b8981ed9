"""End to end through the real ComfyUI server: /object_info, /prompt, /history, the websocket."""
import json
import os
import time

import psutil
import pytest
from PIL import Image

from tests.support.api_workflows import MODEL_FILE_INPUTS, runnable_on_test_host, text_to_image
from tests.support.comfy_server import PromptFailed
from conftest import COMFYUI_DIR, cpu_machine_only

pytestmark = pytest.mark.server

FBC_NODE = ("FluxAccelFirstBlockCache",
            {"residual_diff_threshold": 0.5, "start_percent": 0.0, "end_percent": 1.0, "max_consecutive_hits": 0})
COMPILE_NODE = ("FluxAccelCompile", {"mode": "default", "dynamic_shapes": "automatic"})
FP8_NODE = ("FluxAccelFP8DynamicQuantize", {"activation_scaling": "per-row", "exclude": ""})
ATTENTION_NODE = ("FluxAccelAttention", {"backend": "auto"})
# On the CPU test host "gpus" are worker processes (gloo).
CONTEXT_PARALLEL_NODE = ("FluxAccelContextParallel",
                         {"gpus": 2, "ulysses_degree": 0, "ring_degree": 1, "port": 0, "cfg_parallel": False,
                          "ranks": "this machine"})


@pytest.mark.parametrize("node_id, display_name", [
    ("FluxAccelFirstBlockCache", "Apply First Block Cache"),
    ("FluxAccelCompile", "Compile FLUX"),
    ("FluxAccelFP8DynamicQuantize", "FP8 Dynamic Quantize"),
    ("FluxAccelContextParallel", "Context Parallel (multi-GPU)"),
    ("FluxAccelAttention", "FLUX Attention Backend"),
])
def test_object_info_lists_the_pack_under_one_category(comfy_server, node_id, display_name):
    node = comfy_server.get("/object_info")[node_id]
    assert node["category"] == "FLUX acceleration"
    assert node["display_name"] == display_name
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


def run_reports(sampler_texts):
    """Whose reports the sampler node shows at the end of the prompt (the editor shows its latest text),
    with the report lines themselves."""
    lines = sampler_texts[-1].splitlines()
    return sorted(line.split(":")[0] for line in lines), lines


def compile_progress(sampler_texts):
    """What the sampler node showed while graphs compiled (a passing last line)."""
    last_lines = [text.splitlines()[-1] for text in sampler_texts]
    return [line for line in last_lines if line.startswith("Compile FLUX: compiling graph ")]


def test_compiled_and_cached_model_reports_both_on_the_sampler_node(comfy_server):
    _, texts = comfy_server.run_showing_node_texts(text_to_image([COMPILE_NODE, FBC_NODE], steps=4, seed=8))
    reports, lines = run_reports(texts["sampler"])
    assert reports == ["Compile FLUX", "First Block Cache (threshold 0.5)"]
    assert all(line in comfy_server.log() for line in lines)
    assert os.path.isdir(os.path.join(COMFYUI_DIR, "user", "fluxaccel", "torch-compile-cache"))


def test_compile_shows_progress_while_compiling_and_none_when_warm(comfy_server):
    # Dynamo keeps graphs per backend, and no other test uses this setting's backend: this run's
    # graphs are new whatever ran before.
    dynamic = (COMPILE_NODE[0], {**COMPILE_NODE[1], "dynamic_shapes": "dynamic"})
    workflow = text_to_image([dynamic], width=192, height=192, steps=2, seed=10)
    _, cold = comfy_server.run_showing_node_texts(workflow)
    _, warm = comfy_server.run_showing_node_texts({**workflow, "sampler": {**workflow["sampler"], "inputs": {
        **workflow["sampler"]["inputs"], "seed": 11}}})
    assert compile_progress(cold["sampler"]), "a new size compiles, and says so while it does"
    assert " compiling graph " not in cold["sampler"][-1], "the run's report replaces the progress line"
    assert compile_progress(warm["sampler"]) == []
    assert warm["sampler"][-1].startswith("Compile FLUX: no graph compiled this run (all shapes seen before)")


def test_compile_alone_serves_a_second_and_third_size(comfy_server):
    """On a GPU the server loads models with DynamicVRAM, whose per-layer weight streaming broke Dynamo's
    size-generic recompile (the second size); Compile FLUX takes its clone off it."""
    for size, seed in ((96, 12), (128, 13), (112, 14)):
        _, texts = comfy_server.run_showing_node_texts(text_to_image([COMPILE_NODE], width=size, height=size,
                                                                     steps=2, seed=seed))
        assert run_reports(texts["sampler"])[0] == ["Compile FLUX"], texts["sampler"]


@cpu_machine_only  # the FP8 line of a machine without FP8 tensor cores
def test_fp8_compile_and_cache_stack_through_the_real_loader(comfy_server):
    """The whole stack on the loader-detected test FLUX: the FP8 node reports on itself, the others on the sampler."""
    _, texts = comfy_server.run_showing_node_texts(text_to_image([FP8_NODE, COMPILE_NODE, ATTENTION_NODE, FBC_NODE],
                                                                 steps=4, seed=9))
    [fp8_report] = texts["accel0"]
    assert fp8_report.startswith("FP8 Dynamic Quantize: 13 linear layers to FP8 (weight-only: cpu has no FP8 tensor cores")
    assert run_reports(texts["sampler"])[0] == ["Compile FLUX", "First Block Cache (threshold 0.5)"]


@pytest.mark.parametrize("stack", [[FP8_NODE, COMPILE_NODE, FBC_NODE],
                                   [FP8_NODE, COMPILE_NODE, ATTENTION_NODE, FBC_NODE, CONTEXT_PARALLEL_NODE]],
                         ids=["one-process", "context-parallel"])
def test_interrupt_stops_sampling_through_every_node_promptly_and_the_next_prompt_runs(comfy_server, stack):
    comfy_server.run(text_to_image(stack, steps=2, seed=12))  # loaded and compiled: the next run samples at once
    prompt_id = comfy_server.queue(text_to_image(stack, steps=1000, seed=13))
    comfy_server.wait_until_running(prompt_id)
    time.sleep(2)
    interrupted_at = time.monotonic()
    comfy_server.post("/interrupt", {"prompt_id": prompt_id})
    with pytest.raises(PromptFailed, match="execution_interrupted"):
        comfy_server.wait(prompt_id, timeout=60)
    assert time.monotonic() - interrupted_at < 5
    comfy_server.run(text_to_image(stack, steps=2, seed=14))


def test_bad_fp8_exclusion_fails_the_prompt_and_the_server_stays_up(comfy_server):
    bad = (FP8_NODE[0], {**FP8_NODE[1], "exclude": "no_such_layer"})
    with pytest.raises(PromptFailed, match="exclude pattern 'no_such_layer' matches no linear layer"):
        comfy_server.run(text_to_image([bad]))
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"] == "0.30.0"


def test_bad_window_fails_validation_and_the_server_stays_up(comfy_server):
    bad = (FBC_NODE[0], {**FBC_NODE[1], "start_percent": 0.8, "end_percent": 0.2})
    with pytest.raises(PromptFailed, match="must not be greater than end_percent"):
        comfy_server.queue(text_to_image([bad]))
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"] == "0.30.0"


WORKFLOWS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
API_WORKFLOWS = sorted(f for f in os.listdir(WORKFLOWS_DIR) if f.endswith(".api.json"))


def input_errors(node_id, node, object_info, workflow):
    spec = object_info[node["class_type"]]
    declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
    errors = [f"{node_id}: missing {name}" for name in spec["input"].get("required", {}) if name not in node["inputs"]]
    for name, value in node["inputs"].items():
        if name not in declared:
            errors.append(f"{node_id}: unknown input {name}")
            continue
        kind, options = declared[name][0], declared[name][1] if len(declared[name]) > 1 else {}
        if isinstance(value, list):
            source = workflow[value[0]]
            output_type = object_info[source["class_type"]]["output"][value[1]]
            if output_type != kind:
                errors.append(f"{node_id}.{name}: {output_type} linked into {kind}")
        elif isinstance(kind, list) and (node["class_type"], name) not in MODEL_FILE_INPUTS and value not in kind:
            # The real models' files are not on CI: file names are checked where the workflows run (below).
            errors.append(f"{node_id}.{name}: {value!r} is not one of its options")
        elif kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
            errors.append(f"{node_id}.{name}: {value} outside [{options.get('min')}, {options.get('max')}]")
    return errors


def read_api_workflow(filename):
    with open(os.path.join(WORKFLOWS_DIR, filename)) as f:
        return json.load(f)


@pytest.mark.parametrize("filename", API_WORKFLOWS)
def test_shipped_api_workflows_match_the_server(comfy_server, filename):
    workflow = read_api_workflow(filename)
    object_info = comfy_server.get("/object_info")
    unknown = {node["class_type"] for node in workflow.values()} - object_info.keys()
    assert not unknown, f"node types this ComfyUI does not have: {unknown}"
    errors = [error for node_id, node in workflow.items() for error in input_errors(node_id, node, object_info, workflow)]
    assert not errors


# The nodes that take the sampled MODEL: KSampler, or the guider of SamplerCustomAdvanced (FLUX.2's graph).
SAMPLING_MODEL_INPUTS = ("KSampler", "BasicGuider")


def sampled_model_chain(workflow):
    """The node ids the sampled MODEL passes through, from the sampler (or guider) back to the loader."""
    [node_id] = [node_id for node_id, node in workflow.items() if node["class_type"] in SAMPLING_MODEL_INPUTS]
    chain = []
    while "model" in workflow[node_id]["inputs"]:
        node_id = workflow[node_id]["inputs"]["model"][0]
        chain.append(node_id)
    return chain


@pytest.mark.parametrize("filename", API_WORKFLOWS)
def test_every_node_of_the_pack_in_a_shipped_workflow_shapes_the_sampled_model(filename):
    """A node whose MODEL output goes nowhere is silently skipped by ComfyUI: the workflow would not do
    what its name says."""
    workflow = read_api_workflow(filename)
    pack_nodes = {node_id for node_id, node in workflow.items() if node["class_type"].startswith("FluxAccel")}
    assert pack_nodes <= set(sampled_model_chain(workflow))


@pytest.mark.parametrize("filename", API_WORKFLOWS)
def test_shipped_api_workflows_run_on_the_test_host(comfy_server, filename):
    """Each shipped workflow through /prompt, on the test models (see runnable_on_test_host for what changes)."""
    entry = comfy_server.run(runnable_on_test_host(read_api_workflow(filename)))
    [image] = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert image["filename"].startswith(filename[:-len(".api.json")])


def test_the_workflow_check_catches_mistakes(comfy_server):
    with open(os.path.join(WORKFLOWS_DIR, "flux1-dev-first-block-cache.api.json")) as f:
        workflow = json.load(f)
    workflow["8"]["inputs"]["sampler_name"] = "no_such_sampler"
    workflow["7"]["inputs"]["residual_diff_threshold"] = 5.0
    del workflow["8"]["inputs"]["seed"]
    workflow["10"]["inputs"]["vae"] = ["1", 0]
    object_info = comfy_server.get("/object_info")
    errors = [error for node_id, node in workflow.items() for error in input_errors(node_id, node, object_info, workflow)]
    assert len(errors) == 4, errors


def context_parallel_workers(comfy_server):
    return [child for child in psutil.Process(comfy_server.process.pid).children(recursive=True)
            if any(part.endswith(os.path.join("context_parallel", "worker.py")) for part in child.cmdline())]


@cpu_machine_only  # the ranks are processes there; on GPUs the line counts GPUs
def test_context_parallel_stack_reports_on_the_sampler_node_and_keeps_its_workers(comfy_server):
    stack = [FP8_NODE, COMPILE_NODE, FBC_NODE, CONTEXT_PARALLEL_NODE]
    _, texts = comfy_server.run_showing_node_texts(text_to_image(stack, steps=4, seed=15))
    reports, lines = run_reports(texts["sampler"])
    assert reports == ["Compile FLUX", "Context Parallel (multi-GPU)", "First Block Cache (threshold 0.5)"]
    [report] = [line for line in lines if line.startswith("Context Parallel")]
    assert report.startswith("Context Parallel (multi-GPU): 2 processes (Ulysses 2 x ring 1); First Block Cache "
                             "took the same 4 decisions on every rank")
    workers = context_parallel_workers(comfy_server)
    assert len(workers) == 1
    comfy_server.run(text_to_image(stack, steps=2, seed=16))
    assert context_parallel_workers(comfy_server) == workers, "workers stay for the next prompt"


def test_a_killed_context_parallel_worker_fails_the_prompt_and_the_next_prompt_runs(comfy_server):
    stack = [CONTEXT_PARALLEL_NODE]
    comfy_server.run(text_to_image(stack, steps=2, seed=17))
    prompt_id = comfy_server.queue(text_to_image(stack, steps=1000, seed=18))
    comfy_server.wait_until_running(prompt_id)
    time.sleep(2)
    [worker] = context_parallel_workers(comfy_server)
    worker.kill()
    killed_at = time.monotonic()
    with pytest.raises(PromptFailed, match="worker 1: exited with code -9"):
        comfy_server.wait(prompt_id, timeout=60)
    assert time.monotonic() - killed_at < 10
    comfy_server.run(text_to_image(stack, steps=2, seed=19))
    assert len(context_parallel_workers(comfy_server)) == 1


def test_a_ulysses_degree_that_does_not_divide_the_heads_fails_the_prompt_and_the_server_stays_up(comfy_server):
    bad = (CONTEXT_PARALLEL_NODE[0], {**CONTEXT_PARALLEL_NODE[1], "gpus": 5})
    with pytest.raises(PromptFailed, match="Ulysses degree 5 does not divide the model's 24 attention heads"):
        comfy_server.run(text_to_image([bad]))
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"] == "0.30.0"
