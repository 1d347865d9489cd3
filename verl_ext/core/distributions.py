"""Exact next-token distribution math shared by the analysis and the two-model decoder.

Every function takes log-probabilities over the full vocabulary on the last dimension
(`[..., V]`) and works in float32 or wider. Positions where a distribution puts zero mass
(log-prob −inf) contribute 0 to every sum: 0·log 0 := 0.
"""

from __future__ import annotations

import torch


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(v) = z_v/T − logsumexp(z/T), computed in float32 (or the input's wider dtype)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _p_times(logp: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_v π(v)·values(v), with 0·anything := 0 where π(v) = 0 (so −inf/NaN never leak)."""
    p = logp.exp()
    return torch.where(p > 0, p * values, torch.zeros_like(p)).sum(dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(π) = −Σ_v π(v) log π(v)."""
    return -_p_times(logp, logp)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p(v) [log p(v) − log q(v)] (+inf where p(v) > 0 = q(v))."""
    return _p_times(logp, logp - logq)


def averaged_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """½[KL(p‖q) + KL(q‖p)]: the paper's symmetric KL criterion (not Jensen–Shannon)."""
    return 0.5 * (kl_divergence(logp, logq) + kl_divergence(logq, logp))


def extrapolated_log_softmax(logp_rl: torch.Tensor, logp_base: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 7: log π_Extra = (1+γ)·log π_RL − γ·log π_B − log Z.

    γ = 0 returns π_RL exactly. Tokens with π_RL(v) = 0 keep probability 0; for γ > 0 a
    token with π_B(v) = 0 < π_RL(v) would get infinite weight, so the base log-probs must
    come from an untruncated softmax (always true for model logits).
    """
    if gamma == 0:
        return logp_rl
    scores = (1.0 + gamma) * logp_rl - gamma * logp_base
    scores = torch.where(torch.isneginf(logp_rl), torch.full_like(scores, float("-inf")), scores)
    return torch.log_softmax(scores, dim=-1)


def top_p_mask(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus set: keep the smallest set of most probable tokens whose mass reaches top_p.

    Tokens in (probability descending, token id ascending) order; a token is kept when the mass
    of the tokens before it is < top_p (the usual vLLM / transformers rule, with ties broken by id;
    the most probable token is always kept). Returns a bool mask shaped like `logp`.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return torch.ones_like(logp, dtype=torch.bool)
    flat = logp.reshape(-1, logp.shape[-1])
    vocab = flat.shape[-1]
    # Most nucleus sets are small: decide each row on its `_NUCLEUS_CANDIDATES` most probable tokens
    # (a partial sort), and fully sort only the rows whose nucleus may reach past them. Ties are
    # broken by token id everywhere, so both paths give the same set.
    k = min(_NUCLEUS_CANDIDATES, vocab)
    if k == vocab or must_not_sync(flat):
        return _nucleus_by_sorting(flat, top_p).view(logp.shape)
    _, top_ids = torch.topk(flat, k, dim=-1)
    by_id = torch.sort(top_ids, dim=-1).values  # candidates in (log-prob descending, id ascending) order:
    cand_logp, order = torch.sort(flat.gather(-1, by_id), dim=-1, descending=True, stable=True)
    keep = _keep_sorted(cand_logp, top_p)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, by_id.gather(-1, order), keep)
    last = cand_logp[:, -1:]
    cut_tie = (flat == last).sum(-1) > (cand_logp == last).sum(-1)  # topk split a tie: which ids it took is arbitrary
    longer = (keep[:, -1] | cut_tie).nonzero(as_tuple=True)[0]
    if longer.numel():
        mask[longer] = _nucleus_by_sorting(flat[longer], top_p)
    return mask.view(logp.shape)


_NUCLEUS_CANDIDATES = 64


def must_not_sync(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on `t`'s device: no host synchronisation and no
    data-dependent shapes are allowed, so `top_p_mask` takes its one fixed-shape path (a full sort,
    which gives the same set as the candidate path)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _nucleus_by_sorting(flat: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logp, order = torch.sort(flat, dim=-1, descending=True, stable=True)
    return torch.zeros_like(flat, dtype=torch.bool).scatter(-1, order, _keep_sorted(sorted_logp, top_p))


def _keep_sorted(sorted_logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """On log-probs sorted in descending order: keep while the mass before a token is < top_p."""
    p = sorted_logp.exp()
    keep = (torch.cumsum(p, dim=-1) - p) < top_p
    keep[..., 0] = True
    return keep


def top_p_log_softmax(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Renormalised nucleus distribution: log π(v) − log Σ_{u∈S} π(u) on S, −inf elsewhere."""
    if top_p >= 1.0:
        return logp
    masked = logp.masked_fill(~top_p_mask(logp, top_p), float("-inf"))
    return masked - torch.logsumexp(masked, dim=-1, keepdim=True)


def top_k_log_softmax(logp: torch.Tensor, top_k: int) -> torch.Tensor:
    """Renormalised top-k distribution: log π(v) − log Σ_{u∈K} π(u) on the k most probable tokens
    (ties at the k-th value broken by token id), −inf elsewhere. k <= 0 or k >= V keeps every token."""
    vocab = logp.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return logp
    order = torch.sort(logp, dim=-1, descending=True, stable=True).indices[..., :top_k]
    keep = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, True)
    masked = logp.masked_fill(~keep, float("-inf"))
    return masked - torch.logsumexp(masked, dim=-1, keepdim=True)


def sampling_log_softmax(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from (vLLM's "processed" log-probs, its order of steps):

        log π_s = log nucleus_p( top_k( softmax(z / T) ) ),

    top-k first, then the nucleus of the renormalised top-k distribution. Temperature 0 is greedy:
    top_k = 1 at T = 1, a point mass whose log-prob is 0.
    """
    if temperature == 0:
        temperature, top_k = 1.0, 1
    return top_p_log_softmax(top_k_log_softmax(log_softmax(logits, temperature), top_k), top_p)
