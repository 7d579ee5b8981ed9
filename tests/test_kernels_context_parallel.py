"""kernels.context_parallel's layout math, in one process: shares, padding, the key mask, the degrees."""
import pytest
import torch
import torch.nn.functional as F

from fluxaccel.kernels.context_parallel.sharding import (ParallelDegrees, balanced_shares, degrees_problem, pad_tokens,
                                                          shard_references, shard_text, splits_batch, token_shard)


def test_balanced_shares_cover_everything_with_counts_one_apart():
    assert balanced_shares(7, 3) == [(0, 3), (3, 2), (5, 2)]
    assert balanced_shares(8, 4) == [(0, 2), (2, 2), (4, 2), (6, 2)]


def rank_sequence(text, image, references, shard):
    """What one rank holds: its text share, its image rows, its reference tokens, each padded (as the
    post_input hook builds it)."""
    start, end = shard.image_token_range()
    return torch.cat((shard_text(text, shard), pad_tokens(image[:, start:end], shard.padded_image_tokens),
                      shard_references(references, shard)), dim=1)


@pytest.mark.parametrize("ranks, token_rows, row_tokens, text_tokens, reference_tokens", [
    (2, 4, 3, 6, 0), (2, 3, 4, 7, 0), (4, 7, 2, 9, 0),
    (2, 4, 3, 6, 8),  # FLUX Kontext: reference tokens that divide
    (4, 7, 2, 9, 15),  # ... and that do not
])
def test_attention_over_all_ranks_shares_with_the_padding_mask_is_attention_over_the_whole(
        ranks, token_rows, row_tokens, text_tokens, reference_tokens):
    """Gathered in rank order, padded, with padded keys masked, attention gives each real token what it
    gets over the whole sequence: the layout Ulysses sees after its all-to-all."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, text_tokens, 8, generator=generator)
    image = torch.randn(1, token_rows * row_tokens, 8, generator=generator)
    references = torch.randn(1, reference_tokens, 8, generator=generator)
    shards = [token_shard(rank, ranks, token_rows, row_tokens, text_tokens, reference_tokens) for rank in range(ranks)]
    gathered = torch.cat([rank_sequence(text, image, references, shard) for shard in shards], dim=1)
    mask = shards[0].key_padding_mask(gathered.dtype, gathered.device)
    assert mask.shape[-1] == gathered.shape[1] and shards[0].padded == (mask.min() < 0).item()

    sharded_out = F.scaled_dot_product_attention(gathered[:, None], gathered[:, None], gathered[:, None], attn_mask=mask)[:, 0]
    whole = torch.cat((text, image, references), dim=1)
    expected = F.scaled_dot_product_attention(whole[:, None], whole[:, None], whole[:, None])[:, 0]
    real = mask.view(-1) == 0
    # Real tokens of the gathered sequence, in rank order, are each rank's text, image and reference shares.
    order = []
    for shard in shards:
        text_start, text_count = shard.text
        order += list(range(text_start, text_start + text_count))
        image_start, image_end = shard.image_token_range()
        order += [text_tokens + i for i in range(image_start, image_end)]
        reference_start, reference_count = shard.reference
        order += [text_tokens + image.shape[1] + i for i in range(reference_start, reference_start + reference_count)]
    assert sorted(order) == list(range(whole.shape[1]))
    torch.testing.assert_close(sharded_out[:, real], expected[:, order])


def test_degrees_that_do_not_divide_the_heads_name_the_ones_that_do():
    assert degrees_problem(ParallelDegrees(4, 2), heads=24) is None
    assert degrees_problem(ParallelDegrees(5, 1), heads=24) == (
        "the Ulysses degree 5 does not divide the model's 24 attention heads; use one of 1, 2, 3, 4, 6, 8, 12, 24 "
        "(and ring attention for the rest).")


def test_the_batch_splits_only_when_it_and_its_conditionings_divide():
    cfg_parallel = ParallelDegrees(2, 1, batch=2)
    assert splits_batch(2, 2, cfg_parallel)  # cond + uncond
    assert splits_batch(4, 1, cfg_parallel)  # a batch of 4 images of one prompt
    assert not splits_batch(1, 1, cfg_parallel)  # cfg 1, one image
    assert not splits_batch(6, 3, cfg_parallel)  # three conditionings cannot be halved
    assert not splits_batch(2, 2, ParallelDegrees(2, 1))
