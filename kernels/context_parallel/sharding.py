"""Context parallelism for a diffusion transformer over image rows and text tokens: which rank holds
which tokens, attention across ranks (para-attn's Ulysses all-to-all and ring), gathering the rows.

Layout: the world's ranks form `batch` groups (CFG parallel: each takes a share of the batch) of
`ring` groups of `ulysses` consecutive ranks. Within its batch group, rank r holds the r-th share
of the image's token rows, of the text tokens and of the reference images' tokens (FLUX Kontext's,
if any); its local sequence is [its text, its image rows, its reference tokens], each padded to the
longest share so every rank holds the same number of tokens (what the all-to-all needs). Ulysses
gathers the sequence of its group for 1/ulysses of the heads; ring attention then passes keys and
values around the ring groups. Attention does not care about
the order of the tokens it sees, as long as each token keeps its own position encoding, which is
why each rank encodes positions from its own tokens' ids.

Pure torch.distributed and para-attn: nothing here knows about ComfyUI.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from para_attn.para_attn_interface import ring_attn_func, ulysses_attn_func

from .tensor_transport import map_structure


@dataclass(frozen=True)
class ParallelDegrees:
    ulysses: int
    ring: int
    batch: int = 1  # groups of ulysses x ring ranks that take a share of the batch each (CFG parallel)

    @property
    def sequence_size(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.batch * self.sequence_size


def degrees_problem(degrees: ParallelDegrees, heads: int) -> Optional[str]:
    """Why these degrees cannot split a model with `heads` attention heads (None when they can)."""
    if min(degrees.ulysses, degrees.ring, degrees.batch) < 1:
        return f"Ulysses and ring degrees must be at least 1, got {degrees.ulysses} and {degrees.ring}."
    if heads % degrees.ulysses != 0:
        fitting = [d for d in range(1, heads + 1) if heads % d == 0]
        return (f"the Ulysses degree {degrees.ulysses} does not divide the model's {heads} attention heads; "
                f"use one of {', '.join(map(str, fitting))} (and ring attention for the rest).")
    return None


def balanced_shares(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, count) of each of `parts` contiguous shares of `total` items, counts differing by at most one."""
    base, extra = divmod(total, parts)
    shares, start = [], 0
    for index in range(parts):
        count = base + (1 if index < extra else 0)
        shares.append((start, count))
        start += count
    return shares


@dataclass(frozen=True)
class TokenShard:
    """One rank's tokens of one forward: image token rows, text tokens and reference image tokens,
    each padded to equal lengths."""
    rank: int
    row_shares: tuple  # (start, count) of image token rows, per rank
    text_shares: tuple  # (start, count) of text tokens, per rank
    row_tokens: int  # image tokens per row
    reference_shares: tuple  # (start, count) of the reference images' tokens, per rank (counts 0 without)

    @property
    def rows(self) -> tuple[int, int]:
        return self.row_shares[self.rank]

    @property
    def text(self) -> tuple[int, int]:
        return self.text_shares[self.rank]

    @property
    def padded_image_tokens(self) -> int:
        return max(count for _, count in self.row_shares) * self.row_tokens

    @property
    def padded_text_tokens(self) -> int:
        return max(count for _, count in self.text_shares)

    @property
    def reference(self) -> tuple[int, int]:
        return self.reference_shares[self.rank]

    @property
    def padded_reference_tokens(self) -> int:
        return max(count for _, count in self.reference_shares)

    @property
    def image_tokens(self) -> int:
        return self.rows[1] * self.row_tokens

    @property
    def padded(self) -> bool:
        return any(len({count for _, count in shares}) > 1
                   for shares in (self.row_shares, self.text_shares, self.reference_shares))

    def image_token_range(self) -> tuple[int, int]:
        start, count = self.rows
        return start * self.row_tokens, (start + count) * self.row_tokens

    def key_padding_mask(self, dtype, device) -> torch.Tensor:
        """Additive mask over the gathered sequence (all ranks' [text, image, reference] in rank order):
        0 for real tokens, -inf for padding, shaped to broadcast over batch, heads and queries.
        Filled on the device (no copy from the host, which a CUDA graph could not hold)."""
        padded = (self.padded_text_tokens, self.padded_image_tokens, self.padded_reference_tokens)
        mask = torch.zeros(len(self.row_shares) * sum(padded), dtype=dtype, device=device)
        position = 0
        for (_, text_count), (_, row_count), (_, reference_count) in zip(self.text_shares, self.row_shares,
                                                                        self.reference_shares):
            for count, length in zip((text_count, row_count * self.row_tokens, reference_count), padded):
                mask[position + count:position + length].fill_(float("-inf"))
                position += length
        return mask.view(1, 1, 1, -1)


def token_shard(rank: int, world_size: int, token_rows: int, row_tokens: int, text_tokens: int,
                reference_tokens: int = 0) -> TokenShard:
    return TokenShard(rank, tuple(balanced_shares(token_rows, world_size)),
                      tuple(balanced_shares(text_tokens, world_size)), row_tokens,
                      tuple(balanced_shares(reference_tokens, world_size)))


def shard_references(tokens: torch.Tensor, shard: TokenShard) -> torch.Tensor:
    """This rank's share of the reference tokens (all of them, along dim 1), padded."""
    start, count = shard.reference
    return pad_tokens(tokens[:, start:start + count], shard.padded_reference_tokens)


def pad_tokens(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Zero tokens appended along dim 1 up to `length`."""
    missing = length - tokens.shape[1]
    if missing == 0:
        return tokens
    return torch.cat((tokens, tokens.new_zeros(tokens.shape[0], missing, *tokens.shape[2:])), dim=1)


def shard_text(tokens: torch.Tensor, shard: TokenShard) -> torch.Tensor:
    start, count = shard.text
    return pad_tokens(tokens[:, start:start + count], shard.padded_text_tokens)


@dataclass
class RankGroups:
    """This rank's process groups: the world; its batch group's sequence ranks, their Ulysses and ring
    groups; and the ranks at its sequence position in the other batch groups."""
    world: Optional[dist.ProcessGroup]
    sequence: Optional[dist.ProcessGroup]
    ulysses: Optional[dist.ProcessGroup]
    ring: Optional[dist.ProcessGroup]
    batch: Optional[dist.ProcessGroup]
    degrees: ParallelDegrees
    rank: int

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.degrees.sequence_size

    @property
    def batch_index(self) -> int:
        return self.rank // self.degrees.sequence_size


def make_rank_groups(degrees: ParallelDegrees) -> RankGroups:
    """Creates the groups; every rank of the initialized world must call it (same groups, same order)."""
    rank = dist.get_rank()
    mine = {}

    def add(kind, ranks):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine[kind] = group

    size = degrees.sequence_size
    for batch_index in range(degrees.batch):
        base = batch_index * size
        add("sequence", [base + i for i in range(size)])
        for ring_index in range(degrees.ring):
            add("ulysses", [base + ring_index * degrees.ulysses + i for i in range(degrees.ulysses)])
        for ulysses_index in range(degrees.ulysses):
            add("ring", [base + r * degrees.ulysses + ulysses_index for r in range(degrees.ring)])
    for position in range(size):
        add("batch", [b * size + position for b in range(degrees.batch)])
    return RankGroups(dist.group.WORLD, mine["sequence"], mine["ulysses"], mine["ring"], mine["batch"], degrees, rank)


def splits_batch(batch_size: int, conditionings: int, degrees: ParallelDegrees) -> bool:
    """Whether the batch groups take a share of the batch each: the batch and its conditionings
    (cond, uncond, each some rows) must split evenly. Otherwise every group runs the whole batch."""
    parts = degrees.batch
    return parts > 1 and batch_size % parts == 0 and (conditionings == 1 or conditionings % parts == 0)


def batch_share(structure, batch_size: int, parts: int, index: int):
    """`structure` with every tensor whose first dimension is the batch cut to the index-th of `parts` shares."""
    def share(value):
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
            return value.chunk(parts)[index]
        return value

    return map_structure(structure, share)


def gather_batch(local_batch: torch.Tensor, group) -> torch.Tensor:
    """The batch groups' shares of an output, concatenated in batch order."""
    gathered = [torch.empty_like(local_batch) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local_batch.contiguous(), group=group)
    return torch.cat(gathered)


AttentionFunction = Callable[..., torch.Tensor]


def parallel_attention(query, key, value, groups: RankGroups, local_attention: AttentionFunction,
                       key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys, [batch, heads, tokens, head_dim] in and out.

    `local_attention(q, k, v, attn_mask=None, ...)` computes attention on one rank's tensors (the
    host's own attention). Padding needs a mask, which ring attention does not take.
    """
    degrees = groups.degrees
    if degrees.ring > 1:
        if key_padding_mask is not None:
            raise ValueError("ring attention needs equal token shares (no padding)")

        def ring_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
            # Contiguous for the rotation of keys and values between GPUs: under Compile FLUX attention's
            # inputs are heads-first views of token-major tensors, and with Ulysses degree 1 they come as is.
            q, k, v = (t.contiguous() for t in (q, k, v))
            return ring_attn_func(q, k, v, scale=scale, mesh=groups.ring)

        if degrees.ulysses == 1:
            return ring_attention(query, key, value)
        return ulysses_attn_func(query, key, value, mesh=groups.ulysses, attn_func=ring_attention)

    def masked_local_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        return local_attention(q, k, v, attn_mask=key_padding_mask)

    return ulysses_attn_func(query, key, value, mesh=groups.ulysses, attn_func=masked_local_attention)


def gather_rows(local_rows: torch.Tensor, shard: TokenShard, patch_size: int, group=None) -> torch.Tensor:
    """All ranks' row shares of a [batch, channels, rows, width] output, concatenated in row order.

    Shares differ by at most one token row, so each is padded to the longest for the all-gather.
    """
    longest = max(count for _, count in shard.row_shares) * patch_size
    padded = F.pad(local_rows, (0, 0, 0, longest - local_rows.shape[2])).contiguous()
    gathered = [torch.empty_like(padded) for _ in shard.row_shares]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([rows[:, :, :count * patch_size] for rows, (_, count) in zip(gathered, shard.row_shares)], dim=2)


def all_ranks_agree(group, device) -> Callable[[bool], bool]:
    """A function that is True when every rank of `group` passes True (ranks capture CUDA graphs
    together or not at all). It waits for the GPU: call it between calls, not inside one."""
    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())
    return agree


def sum_across_ranks(group=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that sums a small tensor over the ranks of `group` (First Block Cache's distance)."""
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor
    return reduce


@dataclass
class ShardedForward:
    """What one rank holds in one forward, for the hooks that shard, attend and measure inside it."""
    groups: RankGroups
    shard: TokenShard
    image_ids: torch.Tensor  # position ids of this rank's image tokens in the whole image, padded
    previous_attention: Optional[Callable] = None  # an attention override that was already in place

    def __post_init__(self):
        self.sum_across_ranks = sum_across_ranks(self.groups.world)
        self._masks = {}

    def key_padding_mask(self, dtype, device) -> Optional[torch.Tensor]:
        if not self.shard.padded:
            return None
        if dtype not in self._masks:
            self._masks[dtype] = self.shard.key_padding_mask(dtype, device)
        return self._masks[dtype]
