"""What the tests (and the benchmarks) drive the real ComfyUI host with: its folder, tiny FLUX models, its
server, the graph editor in a headless browser, workflows, KSampler runs and the pack's reports."""
