"""Gating criteria f(ŷ) of selective token replacement (paper Alg. 1) as pure tensor functions.

At one decoding step the gate sees the two models' next-token log-probabilities
(log π_B, log π_RL, `[N, V]`), the proposed token ŷ (through Δlog p(ŷ)) and a uniform u. Each
criterion is a score s and a direction; the gate fires where s > τ ("above") or s < τ ("below"):

| name         | score s                                        | fires when |
|--------------|------------------------------------------------|------------|
| entropy_base | H(π_B) = −Σ_v π_B(v) log π_B(v)               | s > τ      |
| entropy_rl   | H(π_RL)                                        | s > τ      |
| kl_rl_base   | KL(π_RL‖π_B) = Σ_v π_RL(v)[log π_RL − log π_B] | s > τ      |
| kl_base_rl   | KL(π_B‖π_RL)                                   | s > τ      |
| avg_kl       | ½[KL(π_B‖π_RL) + KL(π_RL‖π_B)]                 | s > τ      |
| delta_logp   | Δlog p(ŷ) = log π_RL(ŷ) − log π_B(ŷ)  (τ < 0)  | s < τ      |
| random       | u ~ U(0, 1)                                    | s < τ      |
| none         | — (never fires: plain proposal sampling)       | never      |
| all          | — (always fires: plain resampling)             | always     |

Only `delta_logp` and `random` depend on the proposed token or a draw; every other score is a
function of the prefix alone. None depends on earlier gate decisions, which is what makes the
experimental speculative rounds exact (see `experimental.py`).

`reads` says which models' distributions a score looks at. A gate that reads only the proposing
model (e.g. `entropy_base` with π_B proposing, `random`, `none`, `all`) is decided while drafting,
before the other model has run; `gate_reads` accounts for the top-k approximation, whose view of
π_RL is taken on π_B's top-k ids and so also reads π_B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from verl_ext.core.distributions import averaged_kl, entropy, kl_divergence

ABOVE, BELOW, NEVER, ALWAYS = "above", "below", "never", "always"


@dataclass(frozen=True)
class GateInputs:
    """What a criterion may look at, for N positions."""

    logp_base: torch.Tensor  # [N, V] log π_B (full vocabulary, or the top-k view)
    logp_rl: torch.Tensor  # [N, V] log π_RL on the same support as logp_base
    delta_logp: torch.Tensor  # [N] Δlog p(ŷ) of the proposed token
    u: torch.Tensor  # [N] uniform draws in [0, 1)


def _nan(x: GateInputs) -> torch.Tensor:
    return torch.full_like(x.delta_logp, float("nan"))


@dataclass(frozen=True)
class Criterion:
    name: str
    fires_when: str  # ABOVE | BELOW | NEVER | ALWAYS
    score: Callable[[GateInputs], torch.Tensor]
    uses_token: bool  # depends on ŷ (not only on the prefix)
    reads: frozenset[str]  # the distributions the score looks at: a subset of {"base", "rl"}


_BASE, _RL, _BOTH, _NEITHER = frozenset({"base"}), frozenset({"rl"}), frozenset({"base", "rl"}), frozenset()

CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("entropy_base", ABOVE, lambda x: entropy(x.logp_base), False, _BASE),
        Criterion("entropy_rl", ABOVE, lambda x: entropy(x.logp_rl), False, _RL),
        Criterion("kl_rl_base", ABOVE, lambda x: kl_divergence(x.logp_rl, x.logp_base), False, _BOTH),
        Criterion("kl_base_rl", ABOVE, lambda x: kl_divergence(x.logp_base, x.logp_rl), False, _BOTH),
        Criterion("avg_kl", ABOVE, lambda x: averaged_kl(x.logp_base, x.logp_rl), False, _BOTH),
        Criterion("delta_logp", BELOW, lambda x: x.delta_logp, True, _BOTH),
        Criterion("random", BELOW, lambda x: x.u, False, _NEITHER),
        Criterion("none", NEVER, _nan, False, _NEITHER),
        Criterion("all", ALWAYS, _nan, False, _NEITHER),
    )
}


def get_criterion(name: str) -> Criterion:
    """The criterion called `name`; a ValueError listing the valid names otherwise."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; valid criteria: {', '.join(CRITERIA)}") from None


def gate_reads(name: str, top_k_approximation: int = 0) -> frozenset[str]:
    """The models whose distributions the gate of `name` looks at.

    Under the top-k approximation π̃_RL lives on π_B's top-k ids (`sampler.base_top_k_view`), so a
    score that reads π_RL reads π_B too; π̃_B needs π_B alone.
    """
    reads = get_criterion(name).reads
    if top_k_approximation and "rl" in reads:
        reads = reads | {"base"}
    return reads


def can_fire(name: str) -> bool:
    """False only for `none`, whose gate never fires (the other model is then never needed)."""
    return get_criterion(name).fires_when != NEVER


def criterion_score(name: str, inputs: GateInputs) -> torch.Tensor:
    """s(ŷ) of criterion `name` at each position, `[N]` (NaN for none/all)."""
    return get_criterion(name).score(inputs)


def gate(name: str, score: torch.Tensor, threshold: float) -> torch.Tensor:
    """g = 1[s > τ] (above), 1[s < τ] (below), 0 (none) or 1 (all); bool `[N]`."""
    direction = get_criterion(name).fires_when
    if direction == ABOVE:
        return score > threshold
    if direction == BELOW:
        return score < threshold
    return torch.full(score.shape, direction == ALWAYS, dtype=torch.bool, device=score.device)
