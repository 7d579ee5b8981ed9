"""ComfyUI glue: one module per capability, each ending with its ComfyExtension."""

# Where the graph editor lists every node of the pack.
CATEGORY = "FLUX acceleration"
