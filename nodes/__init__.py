"""ComfyUI glue: one module per capability, each ending with its ComfyExtension."""
