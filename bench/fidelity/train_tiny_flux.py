"""Trains a small FLUX, built from ComfyUI's own classes, to draw coloured shapes on command.

The fidelity measurements (bench/fidelity/caches.py) need a FLUX whose sampled images mean something:
random weights give noise, and a cache that keeps noise "close" proves nothing. This script trains
`comfy.model_base.Flux` (the class ComfyUI samples FLUX.1 with) on procedurally drawn 16-channel
latent images: a circle, square or bar, in one of four colours, on the left, center or right,
jittered and overlaid with a smooth random texture so that each seed has detail of its own.
Prompts are "text-like" tokens: a seeded embedding table turns "a red circle left" into the
cross-attention context and its mean into the pooled vector.

How ComfyUI samples FLUX, and so how the model is trained:
- KSampler works in the *processed* latent space (`latent_format.process_in`; `process_out` on the
  way back), so the data is drawn in that space: KSampler's output is `process_out(drawing)`.
- ModelType.FLUX is CONST (rectified flow): x_sigma = (1 - sigma) * x0 + sigma * noise and
  denoised = x - sigma * output, so the network learns the velocity noise - x0.
- ModelSamplingFlux feeds the network the timestep sigma itself; training draws t uniformly and
  maps it through ModelSamplingFlux.sigma, the shifted schedule that the "simple" scheduler walks.
- The guidance embedding is fed FluxGuidance's default 3.5, which sampling uses too.
`check_training_forward` verifies at start that the training forward equals BaseModel.apply_model.

Deterministic: fixed seeds, deterministic algorithms, a fixed thread count. Writes the EMA weights
in fp16 with the unet_config, the data and text parameters and the training log in the metadata.

Usage: python -m bench.fidelity.train_tiny_flux OUT.safetensors [--steps N] [--comfyui DIR]
(about 10 minutes on 2 CPU cores; tests use the result checked in as tests/assets/tiny_flux_shapes.safetensors)
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from typing import NamedTuple

import torch

from tests.support import flux_fixtures
from tests.support.flux_fixtures import PACK_DIR

DEFAULT_COMFYUI_DIR = os.environ.get("COMFYUI_DIR", os.path.join(PACK_DIR, ".host", "ComfyUI"))
THREADS = 2
GUIDANCE = 3.5

SHAPES = ("circle", "square", "bar")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "center", "right")
FILLER_WORDS = ("a",)


class Condition(NamedTuple):
    shape: str
    colour: str
    position: str

    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} {self.position}"


ALL_CONDITIONS = tuple(Condition(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS)


@dataclasses.dataclass(frozen=True)
class ShapesWorld:
    """Everything that decides the drawings and the prompts' embeddings (stored in the weights' metadata)."""
    latent_size: int = 16
    channels: int = 16
    text_width: int = 32
    word_seed: int = 1234  # seeds the word embedding table
    colour_seed: int = 5678  # seeds the 16-d class colours and the background
    background_scale: float = 0.5
    background_tone_jitter: float = 0.15  # per-image shift of the background colour
    brightness_jitter: float = 0.1  # per-image relative change of the shape's colour
    position_jitter: float = 0.75  # latent pixels, uniform +-
    size_jitter: float = 0.08  # relative, uniform +-
    # Per-image smooth random texture over everything: detail that each seed decides during sampling,
    # so sampling paths bend as in real images instead of running straight to one drawing per prompt.
    texture_amplitude: float = 0.3  # standard deviation per channel
    texture_blur: float = 1.0  # latent pixels, Gaussian
    edge_softness: float = 0.35  # latent pixels: anti-aliased edges, so jitter moves them smoothly
    circle_radius: float = 3.3
    square_half_side: float = 3.5
    bar_half_width: float = 1.3
    bar_half_height: float = 5.5
    centers_x: tuple = (4.0, 8.0, 12.0)  # left, center, right

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ShapesWorld":
        fields = json.loads(text)
        fields["centers_x"] = tuple(fields["centers_x"])
        return cls(**fields)


def model_unet_config():
    """hidden 128, 8 heads of 16 (axes_dim 4+6+6), 2 double + 4 single blocks, text and pooled width 32."""
    return flux_fixtures.tiny_flux_unet_config(hidden_size=128, depth=2, depth_single_blocks=4, context_in_dim=32,
                                               vec_in_dim=32, guidance_embed=True)


# ---------------------------------------------------------------------------------------------
# Prompts: a fixed, seeded embedding table stands in for the text encoder.

def word_embeddings(world: ShapesWorld) -> dict:
    words = FILLER_WORDS + SHAPES + COLOURS + POSITIONS
    generator = torch.Generator().manual_seed(world.word_seed)
    table = torch.randn(len(words), world.text_width, generator=generator)
    return dict(zip(words, table))


def encode_prompt(condition: Condition, world: ShapesWorld, embeddings=None):
    """(context (1, tokens, width), pooled (1, width)) as a text encoder would give them."""
    embeddings = embeddings if embeddings is not None else word_embeddings(world)
    context = torch.stack([embeddings[word] for word in condition.prompt().split()]).unsqueeze(0)
    return context, context.mean(dim=1)


def comfy_conditioning(condition: Condition, world: ShapesWorld, guidance=GUIDANCE):
    """The CONDITIONING that CLIPTextEncode + FluxGuidance would hand KSampler for this prompt."""
    context, pooled = encode_prompt(condition, world)
    return [[context, {"pooled_output": pooled, "guidance": guidance}]]


# ---------------------------------------------------------------------------------------------
# Drawings, in the latent space the diffusion model sees (KSampler's output is process_out of it).

def palette(world: ShapesWorld):
    """(class colours (n_colours, channels), background (channels,)): fixed random 16-d vectors."""
    generator = torch.Generator().manual_seed(world.colour_seed)
    colours = torch.randn(len(COLOURS), world.channels, generator=generator)
    background = torch.randn(world.channels, generator=generator) * world.background_scale
    return colours, background


def signed_distance(shape: str, dx, dy, scale, world: ShapesWorld):
    """Distance outside the shape's edge (negative inside), in latent pixels."""
    if shape == "circle":
        return torch.sqrt(dx ** 2 + dy ** 2) - world.circle_radius * scale
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - world.square_half_side * scale
    if shape == "bar":
        return torch.maximum(dx.abs() - world.bar_half_width * scale, dy.abs() - world.bar_half_height * scale)
    raise ValueError(f"unknown shape {shape!r}")


def texture(count, world: ShapesWorld, generator):
    """Smooth Gaussian random fields (count, channels, size, size) of std `texture_amplitude`."""
    radius = int(3 * world.texture_blur) + 1
    taps = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * world.texture_blur ** 2))
    taps /= taps.sum()
    size = world.latent_size
    noise = torch.randn(count * world.channels, 1, size, size, generator=generator)
    # Circular padding: the field is stationary up to the borders.
    field = torch.nn.functional.pad(noise, (radius, radius, radius, radius), mode="circular")
    field = torch.nn.functional.conv2d(field, taps.view(1, 1, 1, -1))
    field = torch.nn.functional.conv2d(field, taps.view(1, 1, -1, 1))
    # Blurred unit white noise has std sum(taps^2) (the 2-D kernel is the outer product of `taps`).
    field = field / (taps ** 2).sum()
    return world.texture_amplitude * field.view(count, world.channels, size, size)


def draw(conditions, world: ShapesWorld, generator=None):
    """Latents (len(conditions), channels, size, size); jittered and textured per image when a generator is given.

    Without a generator each drawing is the condition's canonical template (no jitter, no texture).
    """
    count = len(conditions)
    colours, background = palette(world)

    def jitter(amplitude, *shape):
        if generator is None:
            return torch.zeros(count, *shape)
        return (torch.rand(count, *shape, generator=generator) * 2 - 1) * amplitude

    offsets = jitter(world.position_jitter, 2)
    scales = 1 + jitter(world.size_jitter)
    brightness = 1 + jitter(world.brightness_jitter)
    tones = background + jitter(world.background_tone_jitter, world.channels)

    centers = (torch.arange(world.latent_size, dtype=torch.float32) + 0.5)
    ys, xs = torch.meshgrid(centers, centers, indexing="ij")
    images = []
    for i, condition in enumerate(conditions):
        center_x = world.centers_x[POSITIONS.index(condition.position)] + offsets[i, 0]
        center_y = world.latent_size / 2 + offsets[i, 1]
        distance = signed_distance(condition.shape, xs - center_x, ys - center_y, scales[i], world)
        mask = torch.sigmoid(-distance / world.edge_softness)
        colour = colours[COLOURS.index(condition.colour)] * brightness[i]
        images.append(tones[i, :, None, None] * (1 - mask) + colour[:, None, None] * mask)
    images = torch.stack(images)
    if generator is not None:
        images = images + texture(count, world, generator)
    return images


# ---------------------------------------------------------------------------------------------
# The model and its training.

def make_deterministic(seed=0):
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)


def new_flux_model(unet_config, seed=0):
    """A comfy.model_base.Flux (what ComfyUI samples FLUX.1 with) in fp32, with seeded initial weights."""
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    flux_fixtures.randomize_(model.diffusion_model, seed)
    # adaLN-zero style output: the untrained model predicts zero velocity instead of noise.
    with torch.no_grad():
        model.diffusion_model.final_layer.linear.weight.zero_()
    return model


@contextlib.contextmanager
def trainable(model):
    """Lets autograd through ComfyUI's FLUX blocks without changing their arithmetic.

    - `in_training` makes flux/math.py use its torch RoPE (the comfy_kitchen kernel has no backward);
    - the blocks add residuals in place (`x += ...`) into tensors LayerNorm saved for backward,
      which autograd refuses; an out-of-place `+=` gives the same values on a fresh tensor.
    """
    import comfy.model_management

    previous_iadd = torch.Tensor.__iadd__
    previous_in_training = comfy.model_management.in_training
    torch.Tensor.__iadd__ = lambda self, other: self + other
    comfy.model_management.in_training = True
    model.diffusion_model.requires_grad_(True)
    model.diffusion_model.train()
    try:
        yield model
    finally:
        torch.Tensor.__iadd__ = previous_iadd
        comfy.model_management.in_training = previous_in_training
        model.diffusion_model.requires_grad_(False)
        model.diffusion_model.eval()


def predicted_velocity(model, x, sigma, context, pooled, guidance):
    """The diffusion model's output, called as BaseModel._apply_model calls it for FLUX."""
    timestep = model.model_sampling.timestep(sigma).float()
    return model.diffusion_model(x, timestep, context=context, y=pooled, guidance=guidance)


def check_training_forward(model, world: ShapesWorld):
    """The training forward is what KSampler's apply_model computes: denoised = x - sigma * velocity.

    Checked on ComfyUI's own path (apply_model, inference kernels) against the training path.
    """
    generator = torch.Generator().manual_seed(99)
    conditions = ALL_CONDITIONS[:2]
    x = torch.randn(2, world.channels, world.latent_size, world.latent_size, generator=generator)
    sigma = torch.tensor([0.9, 0.3])
    context, pooled = (torch.cat(parts) for parts in zip(*(encode_prompt(c, world) for c in conditions)))
    guidance = torch.full((2,), GUIDANCE)
    with torch.no_grad():
        denoised = model.apply_model(x, sigma, c_crossattn=context, y=pooled, guidance=guidance)
        with trainable(model):
            velocity = predicted_velocity(model, x, sigma, context, pooled, guidance)
    expected = x - sigma[:, None, None, None] * velocity
    error = (denoised - expected).abs().max().item()
    if error > 1e-4:
        raise AssertionError(f"training forward differs from apply_model by {error}")
    return error


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 4e-4
    warmup_steps: int = 150
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    data_seed: int = 2024
    init_seed: int = 0


def flow_matching_batch(model, world: ShapesWorld, embeddings, settings: TrainingSettings, generator):
    """One batch: random prompts, their drawings, noise at sigmas of the sampling schedule's distribution."""
    picks = torch.randint(len(ALL_CONDITIONS), (settings.batch_size,), generator=generator)
    conditions = [ALL_CONDITIONS[i] for i in picks.tolist()]
    x0 = draw(conditions, world, generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.rand(settings.batch_size, generator=generator).clamp_min(1e-4)
    sigma = model.model_sampling.sigma(t)  # ModelSamplingFlux's shift, as the "simple" scheduler spaces steps
    sigma_ = sigma[:, None, None, None]
    x_sigma = (1 - sigma_) * x0 + sigma_ * noise
    context, pooled = (torch.cat(parts) for parts in zip(*(encode_prompt(c, world, embeddings) for c in conditions)))
    return x_sigma, sigma, context, pooled, noise - x0


def learning_rate(step, settings: TrainingSettings):
    """Linear warm-up, then cosine decay to a tenth."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, world: ShapesWorld, settings: TrainingSettings, log=print):
    """Rectified-flow training; returns the EMA state dict and the loss log."""
    embeddings = word_embeddings(world)
    generator = torch.Generator().manual_seed(settings.data_seed)
    parameters = list(model.diffusion_model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {name: value.detach().clone() for name, value in model.diffusion_model.state_dict().items()}
    guidance = torch.full((settings.batch_size,), GUIDANCE)
    loss_log = []
    running = None
    with trainable(model):
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            x_sigma, sigma, context, pooled, target = flow_matching_batch(model, world, embeddings, settings, generator)
            velocity = predicted_velocity(model, x_sigma, sigma, context, pooled, guidance)
            loss = torch.nn.functional.mse_loss(velocity, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
            optimizer.step()
            update_ema(ema, model.diffusion_model, settings.ema_decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if (step + 1) % 100 == 0 or step == 0:
                loss_log.append((step + 1, round(running, 5)))
                log(f"step {step + 1}/{settings.steps}  loss {running:.4f}  lr {learning_rate(step, settings):.2e}")
    return ema, loss_log


def update_ema(ema, module, decay):
    with torch.no_grad():
        for name, value in module.state_dict().items():
            ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)


def save_weights(path, state_dict, metadata):
    import safetensors.torch

    tensors = {name: value.to(torch.float16).contiguous() for name, value in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file(tensors, path + ".partial", metadata=metadata)
    os.replace(path + ".partial", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="where to write the .safetensors file")
    parser.add_argument("--steps", type=int, default=TrainingSettings.steps)
    parser.add_argument("--comfyui", default=DEFAULT_COMFYUI_DIR, help="ComfyUI folder to import comfy from")
    args = parser.parse_args(argv)

    flux_fixtures.use_comfyui(args.comfyui)
    settings = TrainingSettings(steps=args.steps)
    make_deterministic(settings.init_seed)
    world = ShapesWorld()
    unet_config = model_unet_config()
    model = new_flux_model(unet_config, settings.init_seed)
    print(f"training forward matches apply_model (max difference {check_training_forward(model, world):.2e})")

    started = time.time()
    ema, loss_log = train(model, world, settings, log=lambda line: print(line, flush=True))
    seconds = time.time() - started
    metadata = {
        "format": "fluxaccel tiny FLUX shapes model",
        "unet_config": json.dumps(unet_config, sort_keys=True),
        "world": world.to_json(),
        "training": json.dumps(dataclasses.asdict(settings), sort_keys=True),
        "loss_log": json.dumps(loss_log),
        "training_seconds": f"{seconds:.0f}",
        "threads": str(THREADS),
        "guidance": str(GUIDANCE),
        "torch": torch.__version__,
        "parameters": str(sum(v.numel() for v in ema.values())),
    }
    save_weights(args.out, ema, metadata)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) after {seconds:.0f} s of training")


if __name__ == "__main__":
    main()
