"""What the pack knows about ComfyUI's FLUX-family diffusion models, in one place.

ComfyUI's `comfy.ldm.flux.model.Flux.forward_orig` (FLUX.1, FLUX.1 Kontext, FLUX.2) and
`comfy.ldm.chroma.model.Chroma.forward_orig` call `patches_replace["dit"]` entries named
("double_block", i) with {"img", "txt", "vec", "pe", ...} and ("single_block", i) with
{"img", "vec", "pe", ...}, where the single-stream "img" is the text tokens followed by the image
tokens. A second model family gets its own module like this one.
"""
from . import comfy_contract

SUPPORTED_MODELS = "FLUX.1 (dev, schnell, Kontext), FLUX.2 (dev, klein) and Chroma"
# The tooltip of the MODEL input of the nodes that take any FLUX.
MODEL_INPUT_TOOLTIP = "A FLUX-family model: FLUX.1 (dev, schnell, Kontext), FLUX.2 (dev, klein) or Chroma."
# ComfyUI's classes of those models: Chroma's blocks are FLUX.1's, its modulations come from its own layer.
FLUX_FAMILY_CLASSES = comfy_contract.model_classes(comfy_contract.flux_class, comfy_contract.chroma_class)


# The models whose forward runs `patches["post_input"]` (after the embedders, before the blocks), where
# Context Parallel shares out the tokens: Chroma's forward has no such hook.
POST_INPUT_MODELS = "FLUX.1 (dev, schnell, Kontext) and FLUX.2 (dev, klein)"
POST_INPUT_CLASSES = comfy_contract.model_classes(comfy_contract.flux_class)


def flux_diffusion_model(model_patcher, node_name, supported=FLUX_FAMILY_CLASSES, supported_names=SUPPORTED_MODELS):
    """The patcher's FLUX diffusion model, or a ValueError that says what the node supports, or that this
    ComfyUI lacks what the node needs (see comfy_contract)."""
    comfy_contract.require(node_name)
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    if type(diffusion_model) not in supported:
        raise ValueError(
            f"{node_name} supports {supported_names}; this MODEL's diffusion model is "
            f"{type(diffusion_model).__name__}. Connect one of those, loaded with Load Diffusion Model.")
    return diffusion_model


def block_counts(diffusion_model):
    """(number of double-stream blocks, number of single-stream blocks)."""
    return len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)


# The dimensions of the FLUX blocks' inputs that vary between calls, by the forward's parameter names
# (ComfyUI's DoubleStreamBlock takes img, txt, vec, pe; SingleStreamBlock x, vec, pe): the batch, and the
# tokens of the image, of the prompt, and of both joined (the single blocks' x, the RoPE table pe). vec
# is a tensor, or tuples of modulations (FLUX.2, Chroma), batch first.
VARYING_BLOCK_INPUT_DIMS = {"img": (0, 1), "txt": (0, 1), "x": (0, 1), "pe": (0, 2), "vec": (0,)}


# Layers kept in the model's dtype by the FP8 node: the input embedders and the final layer see
# raw latents, timesteps and guidance and feed the output directly; they are 0.1 GiB of FLUX.1-dev.
# Chroma's distilled guidance layer turns timestep and guidance into every block's modulation.
# (Norms are not Linear layers and are never quantized.)
FP8_SENSITIVE_LAYERS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer",
                        "distilled_guidance_layer")

# The transformer_options entry through which a forward sharded across ranks (context parallel)
# tells the other hooks of that forward what this rank holds (a kernels.context_parallel.ShardedForward).
SHARDED_FORWARD_KEY = "fluxaccel.context_parallel.forward"

# The transformer_options entry through which a model call that is being captured in CUDA graphs, or
# watched before its capture, hands its hooks the capture's `kernels.compile.cuda_graphs.Recording` (or the
# watch): host code that decides per call splits the recording there (see kernels/compile/cuda_graphs.py).
GRAPH_PASS_KEY = "fluxaccel.graph_pass"


def with_graph_pass(transformer_options, graph_pass):
    """The call's transformer options, handing its hooks `graph_pass` (None: a launched call)."""
    return transformer_options if graph_pass is None else {**transformer_options, GRAPH_PASS_KEY: graph_pass}
