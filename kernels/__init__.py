"""Pure torch (and triton) math of the pack; never imports ComfyUI."""
