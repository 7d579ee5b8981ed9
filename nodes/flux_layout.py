"""What the pack knows about ComfyUI's FLUX-family diffusion models, in one place.

ComfyUI's `comfy.ldm.flux.model.Flux.forward_orig` (FLUX.1, FLUX.1 Kontext, FLUX.2) and
`comfy.ldm.chroma.model.Chroma.forward_orig` call `patches_replace["dit"]` entries named
("double_block", i) with {"img", "txt", "vec", "pe", ...} and ("single_block", i) with
{"img", "vec", "pe", ...}, where the single-stream "img" is the text tokens followed by the image
tokens. A second model family gets its own module like this one.
"""
import inspect

import comfy.ldm.chroma.model
import comfy.ldm.flux.model

SUPPORTED_MODELS = "FLUX.1 (dev, schnell, Kontext), FLUX.2 (dev, klein) and Chroma"
# The tooltip of the MODEL input of the nodes that take any FLUX.
MODEL_INPUT_TOOLTIP = "A FLUX-family model: FLUX.1 (dev, schnell, Kontext), FLUX.2 (dev, klein) or Chroma."
# ComfyUI's classes of those models: Chroma's blocks are FLUX.1's, its modulations come from its own layer.
FLUX_FAMILY_CLASSES = (comfy.ldm.flux.model.Flux, comfy.ldm.chroma.model.Chroma)


# The models whose forward runs `patches["post_input"]` (after the embedders, before the blocks), where
# Context Parallel shares out the tokens: Chroma's forward has no such hook.
POST_INPUT_MODELS = "FLUX.1 (dev, schnell, Kontext) and FLUX.2 (dev, klein)"
POST_INPUT_CLASSES = (comfy.ldm.flux.model.Flux,)


def flux_diffusion_model(model_patcher, node_name, supported=FLUX_FAMILY_CLASSES, supported_names=SUPPORTED_MODELS):
    """The patcher's FLUX diffusion model, or a ValueError that says what the node supports."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    if type(diffusion_model) not in supported:
        raise ValueError(
            f"{node_name} supports {supported_names}; this MODEL's diffusion model is "
            f"{type(diffusion_model).__name__}. Connect one of those, loaded with Load Diffusion Model.")
    return diffusion_model


def forward_parameters(diffusion_model) -> list:
    """The names of the model's forward parameters that ComfyUI passes by position, in order: FLUX's are
    (x, timestep, context, y, guidance, ref_latents, control, transformer_options), Chroma's
    (x, timestep, context, guidance, control, transformer_options)."""
    parameters = inspect.signature(diffusion_model.forward).parameters.values()
    return [parameter for parameter in parameters if parameter.kind is parameter.POSITIONAL_OR_KEYWORD]


def forward_inputs(diffusion_model, args, kwargs) -> tuple[dict, dict]:
    """(the inputs by name, transformer_options) of a call of the model's forward as a DIFFUSION_MODEL
    wrapper gets it; the inputs also hold the call's keyword arguments (FLUX Kontext's ref_latents_method)."""
    inputs = {parameter.name: value for parameter, value in zip(forward_parameters(diffusion_model), args)}
    inputs.update(kwargs)
    return inputs, inputs.pop("transformer_options")


def forward_call(diffusion_model, inputs: dict, transformer_options) -> tuple[list, dict]:
    """(args, kwargs) that call the model's forward, or a DIFFUSION_MODEL executor, on `inputs` as
    ComfyUI does: its parameters by position (wrappers read them so), the rest by name."""
    named = {**inputs, "transformer_options": transformer_options}
    args = [named.pop(parameter.name, parameter.default) for parameter in forward_parameters(diffusion_model)]
    return args, named


def block_counts(diffusion_model):
    """(number of double-stream blocks, number of single-stream blocks)."""
    return len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)


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
# watched before its capture, hands its hooks the capture's `kernels.cuda_graphs.Recording` (or the
# watch): host code that decides per call splits the recording there (see kernels/cuda_graphs.py).
GRAPH_PASS_KEY = "fluxaccel.graph_pass"


def with_graph_pass(transformer_options, graph_pass):
    """The call's transformer options, handing its hooks `graph_pass` (None: a launched call)."""
    return transformer_options if graph_pass is None else {**transformer_options, GRAPH_PASS_KEY: graph_pass}
