"""Demo: the real ComfyUI server samples the generated test FLUX with and without First Block Cache.

Prints what the pack's nodes did (as shown on the sampler node in the graph editor) and timings.
Run by `bash scripts/setup_host.sh`; on its own: `.host/venv/bin/python -m bench.demo`.
"""
import os
import sys
import time

from tests.support.api_workflows import text_to_image
from tests.support.comfy_server import ComfyServer

STEPS = 12


def first_block_cache(threshold):
    return ("FluxAccelFirstBlockCache", {
        "residual_diff_threshold": threshold, "start_percent": 0.0, "end_percent": 1.0, "max_consecutive_hits": 0})


def timed_run(server, title, workflow):
    started = time.perf_counter()
    entry, texts = server.run_showing_node_texts(workflow)
    seconds = time.perf_counter() - started
    [image] = entry["outputs"]["save"]["images"]
    print(f"[demo] {title}: {seconds:.1f} s, image output/{image['filename']}")
    for node_id, node_texts in texts.items():
        for line in node_texts[-1].splitlines():  # the editor shows a node's latest text
            print(f"[demo]   shown on node '{node_id}': {line}")


def main():
    comfyui_dir = os.environ["COMFYUI_DIR"]
    print(f"[demo] starting ComfyUI at {comfyui_dir}")
    with ComfyServer(comfyui_dir, python=sys.executable) as server:
        print(f"[demo] ComfyUI {server.get('/system_stats')['system']['comfyui_version']} on {server.url}; "
              f"FLUX test model (hidden 3072, 1 double + 1 single block, random weights), 128x128, {STEPS} steps")
        # The first run also loads the models; it is shown apart so the two timed runs compare.
        timed_run(server, "warm-up (loads the models)", text_to_image(output="image", steps=2))
        timed_run(server, "ComfyUI alone", text_to_image(output="image", steps=STEPS))
        # Random weights move the first block's residual far more between steps than trained ones
        # (docs/FIDELITY.md has the trained-model curve), so the default 0.12 reuses little here.
        for threshold in (0.12, 1.0):
            timed_run(server, f"with Apply First Block Cache ({threshold})",
                      text_to_image([first_block_cache(threshold)], output="image", steps=STEPS))


if __name__ == "__main__":
    main()
