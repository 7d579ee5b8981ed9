"""FLUX's rotary position embedding in plain torch ops, which the compiler fuses with the ops around it."""


def interleaved_rope(x, freqs_cis):
    """x [..., tokens, head_dim] rotated pair by pair (elements 2k, 2k+1) by the 2×2 matrices `freqs_cis`
    [..., tokens, head_dim / 2, 2, 2], computed in freqs_cis's dtype and returned in x's."""
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if pairs.shape[2] != 1 and freqs_cis.shape[2] != 1 and pairs.shape[2] != freqs_cis.shape[2]:
        # More positions than tokens along dimension 2: the first ones apply (ComfyUI's own rule).
        freqs_cis = freqs_cis[:, :, :pairs.shape[2]]
    rotated = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)
