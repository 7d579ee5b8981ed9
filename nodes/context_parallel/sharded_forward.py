"""The sharded FLUX forward that every rank of Context Parallel runs.

One forward on every rank (ComfyUI's process is rank 0, each extra GPU has a worker process):
- the latent's token rows are split across ranks and each rank runs FLUX on its rows, so ComfyUI's
  own `_forward` patchifies, embeds and unpatchifies its share;
- a `patches["post_input"]` hook (run after the embedders) takes this rank's share of the text
  tokens and of the reference images' tokens (FLUX Kontext), pads the shares to the common lengths,
  and gives the image tokens their positions in the whole image, so each rank's RoPE comes from its
  own tokens' ids;
- an `optimized_attention_override` runs attention across ranks (Ulysses, ring), with ComfyUI's
  own attention function on each rank's heads;
- the ranks' output rows are all-gathered into the whole prediction.
Under Compile FLUX's CUDA graphs each rank captures and replays its whole part of a forward (the
collectives and First Block Cache's distance sum inside the graphs) as rank 0 orders with each
forward, so every rank replays the same graphs in the same order.
"""
from typing import Optional

import torch

from ...kernels.compile.cuda_graphs import CallCounts, CapturedCalls, GraphOrder
from ...kernels.context_parallel.sharding import (ParallelDegrees, RankGroups, ShardedForward, all_ranks_agree,
                                                  batch_share, gather_batch, gather_rows, pad_tokens,
                                                  parallel_attention, shard_references, shard_text, splits_batch,
                                                  token_shard)
from .. import comfy_contract, flux_layout
from ..attention import OVERRIDE_KEY as ATTENTION_OVERRIDE_KEY
from .messages import CALL_OPTION_KEYS


def shard_tokens(args):
    """`patches["post_input"]` hook: this rank's text share, image positions in the whole image, and its
    share of the reference images' tokens (FLUX Kontext's: ComfyUI appends all of them to each rank's image
    tokens, with their positions), each share padded."""
    sharded: Optional[ShardedForward] = args["transformer_options"].get(flux_layout.SHARDED_FORWARD_KEY)
    if sharded is None:
        return args
    shard = sharded.shard
    image, image_ids = pad_tokens(args["img"][:, :shard.image_tokens], shard.padded_image_tokens), sharded.image_ids
    if shard.padded_reference_tokens:
        references, reference_ids = (tokens[:, shard.image_tokens:] for tokens in (args["img"], args["img_ids"]))
        image = torch.cat((image, shard_references(references, shard)), 1)
        image_ids = torch.cat((image_ids, shard_references(reference_ids, shard)), 1)
    return {"img": image,
            "txt": shard_text(args["txt"], shard),
            "img_ids": image_ids,
            "txt_ids": shard_text(args["txt_ids"], shard)}


def attention_across_ranks(attention, query, key, value, heads, *args, **kwargs):
    """`optimized_attention_override`: FLUX's attention ([batch, heads, tokens, head_dim]) over all ranks' tokens."""
    options = kwargs.get("transformer_options") or {}
    sharded: Optional[ShardedForward] = options.get(flux_layout.SHARDED_FORWARD_KEY)
    if sharded is None or not kwargs.get("skip_reshape", False):
        raise RuntimeError("Context Parallel met an attention call outside FLUX's sharded blocks")

    def local_attention(q, k, v, attn_mask=None):
        local_kwargs = dict(kwargs, mask=attn_mask, skip_output_reshape=True)
        if sharded.previous_attention is not None:
            return sharded.previous_attention(attention, q, k, v, q.shape[1], *args, **local_kwargs)
        return attention(q, k, v, q.shape[1], *args, **local_kwargs)

    out = parallel_attention(query, key, value, sharded.groups, local_attention,
                             sharded.key_padding_mask(query.dtype, query.device))
    if kwargs.get("skip_output_reshape", False):
        return out
    batch, out_heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, out_heads * head_dim)


def with_sharding_hooks(options, sharded: ShardedForward):
    options = options.copy()
    patches = dict(options.get("patches", {}))
    patches["post_input"] = list(patches.get("post_input", [])) + [shard_tokens]
    options["patches"] = patches
    options[ATTENTION_OVERRIDE_KEY] = attention_across_ranks
    options[flux_layout.SHARDED_FORWARD_KEY] = sharded
    return options


def splits_this_batch(inputs: dict, options, degrees: ParallelDegrees) -> bool:
    conditionings = max((len(options[name]) for name in CALL_OPTION_KEYS if name in options), default=1)
    return splits_batch(inputs["x"].shape[0], conditionings, degrees)


def rank_options(inputs: dict, options, groups: RankGroups):
    """The transformer options this rank's share of a forward sees: under CFG parallel, when the batch
    splits, its batch group's conditionings only."""
    if not splits_this_batch(inputs, options, groups.degrees):
        return options
    parts, index = groups.degrees.batch, groups.batch_index
    options = options.copy()
    for name in CALL_OPTION_KEYS:
        if name in options and len(options[name]) > 1:
            options[name] = options[name][index * len(options[name]) // parts:(index + 1) * len(options[name]) // parts]
    return options


def forward_on_rank(run, diffusion_model, inputs: dict, options, groups: RankGroups):
    """This rank's part of one FLUX forward; returns the whole prediction.

    `inputs` holds the forward's whole inputs by name (comfy_contract.forward_inputs);
    `run(inputs, options)` runs the diffusion model on a share of them.
    """
    if not splits_this_batch(inputs, options, groups.degrees):
        return forward_rows_on_rank(run, diffusion_model, inputs, options, groups)
    share = forward_rows_on_rank(run, diffusion_model, batch_share(inputs, inputs["x"].shape[0], groups.degrees.batch,
                                                                  groups.batch_index),
                                 rank_options(inputs, options, groups), groups)
    return gather_batch(share, groups.batch)


def run_forward_order(order: GraphOrder, graph_calls: CapturedCalls, run, diffusion_model, inputs: dict, options,
                      groups: RankGroups, device, counts: CallCounts):
    """This rank's part of one forward as `order` says: launched, captured in CUDA graphs, or replayed;
    (the whole prediction, why the capture failed or None). Every rank runs the same order."""
    def forward(graph_pass, whole):
        return forward_on_rank(run, diffusion_model, whole, flux_layout.with_graph_pass(options, graph_pass), groups)

    return graph_calls.run(order, forward, (inputs,), {}, rank_options(inputs, options, groups), counts,
                           all_ranks_agree(groups.world, device))


def forward_rows_on_rank(run, diffusion_model, inputs: dict, options, groups: RankGroups):
    """The forward shared by this rank's sequence group: each rank runs a band of the latent's rows."""
    x = inputs["x"]
    patch = diffusion_model.patch_size
    height, width = x.shape[-2:]
    x = comfy_contract.pad_to_patch_size(x, patch)
    token_rows, row_tokens = x.shape[-2] // patch, x.shape[-1] // patch
    ranks = groups.degrees.sequence_size
    text_tokens = inputs["context"].shape[1]
    reference_tokens = sum(-(-reference.shape[-2] // patch) * -(-reference.shape[-1] // patch)
                           for reference in inputs.get("ref_latents") or ())
    if token_rows < ranks:
        raise ValueError(f"the latent has {token_rows} token rows, fewer than the {ranks} GPUs sharing them; "
                         "use a larger image or fewer GPUs.")
    shard = token_shard(groups.sequence_rank, ranks, token_rows, row_tokens, text_tokens, reference_tokens)
    if shard.padded and groups.degrees.ring > 1:
        references = f", the reference images' {reference_tokens} tokens" if reference_tokens else ""
        raise ValueError(f"ring attention needs the image's {token_rows} token rows, the prompt's {text_tokens} "
                         f"tokens{references} to divide by {ranks} GPUs; change the size or use Ulysses only "
                         "(ring degree 1).")
    _, image_ids = diffusion_model.process_img(x, transformer_options=options)
    start, end = shard.image_token_range()
    sharded = ShardedForward(groups, shard, pad_tokens(image_ids[:, start:end], shard.padded_image_tokens),
                             options.get(ATTENTION_OVERRIDE_KEY))
    row_start, row_count = shard.rows
    rows = run({**inputs, "x": x[:, :, row_start * patch:(row_start + row_count) * patch]},
               with_sharding_hooks(options, sharded))
    return gather_rows(rows, shard, patch, groups.sequence)[:, :, :height, :width]


# FLUX Kontext's placements of reference images whose token positions do not depend on the image's size,
# so that each rank's forward, which sees a band of the image's rows, gives them their places in the whole.
SHARDABLE_REFERENCE_METHODS = ("offset", "index")


def unsupported_inputs(diffusion_model, inputs: dict) -> Optional[str]:
    if inputs.get("control") is not None:
        return "ControlNet is not supported yet"
    if inputs.get("attention_mask") is not None:
        return "a text attention mask is not supported yet"
    if inputs.get("ref_latents") is not None:
        method = inputs.get("ref_latents_method", comfy_contract.default_reference_method(diffusion_model))
        if method not in SHARDABLE_REFERENCE_METHODS:
            return (f"reference latents placed by the '{method}' method are not supported "
                    f"(only {' and '.join(SHARDABLE_REFERENCE_METHODS)}, FLUX.1 Kontext's and FLUX.2's defaults)")
    return None
