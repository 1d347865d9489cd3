"""Token draws and batch padding shared by every sampler (the hf_reproducible rollout, the two-model
decoder, evaluation): inverse-CDF draws from uniforms of `rng`, so a token is a deterministic
function of its distribution and its (sequence, position, stream) key; left padding for batched
decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_from_probs(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the first v with F(v) = Σ_{w≤v} p(w) > u·F(V−1); never a zero-mass token.

    p `[..., V]` ≥ 0 (unnormalised is fine), u `[...]` in [0, 1); returns int64 `[...]`. Sums run
    in float64.
    """
    p = p.to(torch.float64)
    cdf = torch.cumsum(p, dim=-1)
    target = (u.to(torch.float64) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    last_positive = p.shape[-1] - 1 - torch.argmax(torch.flip(p > 0, dims=[-1]).to(torch.uint8), dim=-1)
    return torch.minimum(idx, last_positive)


def sample_from_log_probs(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`sample_from_probs` of π = exp(logp)."""
    return sample_from_probs(logp.to(torch.float64).exp(), u)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, min_width: int = 0, allow_empty: bool = False):
    """[B, L] input ids and attention mask, prompts right-aligned; L = max(longest prompt, min_width).
    Empty prompts raise unless `allow_empty` (the engine pads prompt contexts, possibly empty)."""
    width = max(min_width, *(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            if allow_empty:
                continue
            raise ValueError(f"prompt {row} is empty: every request needs at least one prompt token")
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask
