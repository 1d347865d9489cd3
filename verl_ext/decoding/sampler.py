"""The two-stage sampler of selective replacement / extrapolation, as pure tensor functions.

One decoding step, for N positions at once (paper Alg. 1 and Eq. 7):

1. propose   ŷ ~ p_prop = nucleus_top_p( softmax(log π_prop / T) ),  π_prop = π_B (Alg. 1) or
             π_RL (the paper's Table 1 variant);
2. gate      g(ŷ) = f(ŷ) ∈ {0, 1}  (a criterion of `criteria.py`);
3. resample  where g fires, y ~ q = nucleus_top_p( softmax(log q₀ / T) ) with
             q₀ = π_RL ("replace") or q₀ = π_Extra ("extrapolate"), Eq. 7:
             log π_Extra = (1+γ) log π_RL − γ log π_B − log Z;
             else y = ŷ.

So the emitted token has the law  p(y) = p_prop(y)·(1 − g(y)) + [Σ_y' p_prop(y') g(y')]·q(y).

Only the law of y given a fired gate matters, not how y is drawn: `coupling="maximal"` (default)
draws it by speculative-sampling acceptance from the already proposed ŷ (y = ŷ with probability
min(1, q(ŷ)/p_F(ŷ)), else from the residual), which keeps y = ŷ as often as any exact draw can
(what lets the experimental speculative rounds, `experimental.py`, cut fewer rounds);
`coupling="independent"` is a fresh inverse-CDF draw from q, as Alg. 1 is written. Both give the
law above (see `resample`).

Criteria and Eq. 7 use the models' own distributions (temperature 1, full vocabulary: exact);
temperature and top-p shape only the distributions tokens are drawn from. Draws use inverse-CDF
sampling with uniforms from `rng.py`, so a token is a deterministic function of the logits and
its (sequence, position, stream) key.

`base_top_k_approximation = k > 0` reproduces the official code's approximation instead: the
criteria, Δlog p and the resampling distribution live on the base model's top-k tokens
(renormalised); a token missing from the RL model's top-k gets the RL model's smallest returned
log-prob; the nucleus top-p is applied to the resampling distribution on that support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verl_ext.core.distributions import extrapolated_log_softmax, sampling_log_softmax
from verl_ext.core.sampling import sample_from_log_probs, sample_from_probs
from verl_ext.decoding.criteria import GateInputs, can_fire, criterion_score, gate, gate_reads, get_criterion

ACTIONS = ("replace", "extrapolate")
PROPOSERS = ("base", "rl")
COUPLINGS = ("maximal", "independent")


@dataclass(frozen=True)
class DecodingRule:
    """Everything that decides one token given the two models' logits.

    criterion / threshold: the gate f and τ (see `criteria.py`).
    action: "replace" (q₀ = π_RL) or "extrapolate" (q₀ = π_Extra with strength `gamma`).
    propose_from: "base" (Alg. 1) or "rl" (Table 1: ŷ ~ π_RL, then gate and extrapolate).
    temperature, top_p: applied to the proposal and to the resampling distribution.
    base_top_k_approximation: 0 = exact (default); k > 0 = the official code's top-k approximation.
    coupling: how y ~ q is drawn where the gate fired, "maximal" (from ŷ, default) or
    "independent" (a fresh draw); same law, see `resample`.
    """

    criterion: str = "delta_logp"
    threshold: float = -0.3
    action: str = "replace"
    gamma: float = 0.0
    propose_from: str = "base"
    temperature: float = 1.0
    top_p: float = 0.7
    base_top_k_approximation: int = 0
    coupling: str = "maximal"

    def __post_init__(self):
        get_criterion(self.criterion)  # raises with the list of valid names
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; valid actions: {', '.join(ACTIONS)}")
        if self.propose_from not in PROPOSERS:
            raise ValueError(f"unknown propose_from {self.propose_from!r}; valid: {', '.join(PROPOSERS)}")
        if self.action == "replace" and self.gamma != 0:
            raise ValueError("gamma is the extrapolation strength: use action='extrapolate' with gamma != 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.base_top_k_approximation < 0:
            raise ValueError("base_top_k_approximation must be 0 (exact) or a positive k")
        if self.coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {self.coupling!r}; valid: {', '.join(COUPLINGS)}")

    @property
    def resample_gamma(self) -> float:
        return self.gamma if self.action == "extrapolate" else 0.0


# ----------------------------------------------------------------------------- draws


def sampling_log_probs(logp: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log nucleus_top_p(softmax(log π / T)): the distribution a token is actually drawn from (the one
    rule of `distributions.sampling_log_softmax`, without top-k)."""
    return sampling_log_softmax(logp, temperature, 0, top_p)


def propose(logp_proposer: torch.Tensor, u: torch.Tensor, rule: DecodingRule) -> torch.Tensor:
    """ŷ ~ nucleus_top_p(softmax(log π_prop / T)), `[N]`."""
    return sample_from_log_probs(sampling_log_probs(logp_proposer, rule.temperature, rule.top_p), u)


# ----------------------------------------------------------------------------- gate views


def token_delta_logp(logp_base: torch.Tensor, logp_rl: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Eq. 1: Δlog p(ŷ) = log π_RL(ŷ) − log π_B(ŷ), `[N]`."""
    t = token.unsqueeze(-1)
    return (logp_rl.gather(-1, t) - logp_base.gather(-1, t)).squeeze(-1)


@dataclass(frozen=True)
class TopKView:
    """The official approximation's view of one step: everything on the base model's top-k ids."""

    ids: torch.Tensor  # [N, k] the base model's k most probable token ids
    logp_base: torch.Tensor  # [N, k] log π_B on ids, renormalised
    logp_rl: torch.Tensor  # [N, k] log π_RL on ids (missing → RL's min top-k log-prob), renormalised


def returned_rl_log_probs(logp_rl: torch.Tensor, k: int) -> torch.Tensor:
    """log π_RL as the official code sees it, `[N, V]`: log π_RL(v) for v among π_RL's top-k ids
    (K_RL), min_{w∈K_RL} log π_RL(w) for every other token."""
    rl_vals, rl_ids = torch.topk(logp_rl, min(k, logp_rl.shape[-1]), dim=-1)
    in_rl = torch.zeros_like(logp_rl, dtype=torch.bool).scatter_(-1, rl_ids, True)
    return torch.where(in_rl, logp_rl, rl_vals[..., -1:])


def base_top_k_view(logp_base: torch.Tensor, logp_rl: torch.Tensor, k: int) -> TopKView:
    """Top-k log-probs as the official code receives them, filled and renormalised on the base top-k.

    log π̃_B(v) = log π_B(v) − log Σ_{w∈K_B} π_B(w);  log π̃_RL(v) ∝ log π_RL(v) if v ∈ K_RL else
    min_{w∈K_RL} log π_RL(w), renormalised over K_B.
    """
    base_vals, ids = torch.topk(logp_base, min(k, logp_base.shape[-1]), dim=-1)
    rl_on_ids = returned_rl_log_probs(logp_rl, k).gather(-1, ids)
    return TopKView(ids=ids, logp_base=torch.log_softmax(base_vals, dim=-1), logp_rl=torch.log_softmax(rl_on_ids, dim=-1))


def every_token_delta_logp(logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule) -> torch.Tensor:
    """Δlog p(v) for every token v, `[N, V]`: what the gate would have read had ŷ been v. Exact:
    log π_RL(v) − log π_B(v); top-k approximation: `returned_rl_log_probs`(v) − log π_B(v)."""
    k = rule.base_top_k_approximation
    return (returned_rl_log_probs(logp_rl, k) if k else logp_rl) - logp_base


# ----------------------------------------------------------------------------- gate + resample


@dataclass(frozen=True)
class StepOutcome:
    token: torch.Tensor  # [N] int64 emitted token y
    fired: torch.Tensor  # [N] bool g(ŷ)
    score: torch.Tensor  # [N] criterion score s (NaN for none/all)


def evaluate_gate(
    logp_base: torch.Tensor, logp_rl: torch.Tensor, proposal: torch.Tensor, u_gate: torch.Tensor, rule: DecodingRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: (s, g) = (criterion score, fired) at N positions; logp_* full-vocabulary log π (T = 1)."""
    if rule.base_top_k_approximation:
        view = base_top_k_view(logp_base, logp_rl, rule.base_top_k_approximation)
        delta = every_token_delta_logp(logp_base, logp_rl, rule).gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        inputs = GateInputs(view.logp_base, view.logp_rl, delta, u_gate)
    else:
        inputs = GateInputs(logp_base, logp_rl, token_delta_logp(logp_base, logp_rl, proposal), u_gate)
    score = criterion_score(rule.criterion, inputs)
    return score, gate(rule.criterion, score, rule.threshold)


def gate_reads_proposer_only(rule: DecodingRule) -> bool:
    """True when the gate looks at no model but the proposing one (`criteria.gate_reads`): it can
    then be decided before the other model has run (while drafting, in speculative rounds)."""
    return gate_reads(rule.criterion, rule.base_top_k_approximation) <= {rule.propose_from}


def evaluate_gate_on_proposer(
    logp_prop: torch.Tensor, proposal: torch.Tensor, u_gate: torch.Tensor, rule: DecodingRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """`evaluate_gate` for a gate that reads only the proposer: the other model's argument is never
    looked at (checked), so the proposer's log-probs stand in for it and (s, g) are the same."""
    if not gate_reads_proposer_only(rule):
        raise ValueError(f"criterion {rule.criterion!r} reads the other model; use evaluate_gate")
    return evaluate_gate(logp_prop, logp_prop, proposal, u_gate, rule)


def resampling_log_probs(logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule) -> torch.Tensor:
    """log q, q = nucleus_top_p(softmax(log q₀ / T)), q₀ = π_RL or π_Extra(γ) (Eq. 7), over the
    vocabulary, `[N, V]`; under the top-k approximation q lives on π_B's top-k ids (−inf elsewhere)."""
    k = rule.base_top_k_approximation
    if k:
        view = base_top_k_view(logp_base, logp_rl, k)
        q0 = extrapolated_log_softmax(view.logp_rl, view.logp_base, rule.resample_gamma)
        q_on_ids = sampling_log_probs(q0, rule.temperature, rule.top_p)
        return torch.full_like(logp_base, float("-inf"), dtype=q_on_ids.dtype).scatter_(-1, view.ids, q_on_ids)
    q0 = extrapolated_log_softmax(logp_rl, logp_base, rule.resample_gamma)
    return sampling_log_probs(q0, rule.temperature, rule.top_p)


def resampling_probs(logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule) -> torch.Tensor:
    """q of `resampling_log_probs`, `[N, V]` float64."""
    return resampling_log_probs(logp_base, logp_rl, rule).to(torch.float64).exp()


def proposal_log_probs(logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule) -> torch.Tensor:
    """log p_prop, p_prop = nucleus_top_p(softmax(log π_prop / T)) over the vocabulary, `[N, V]`."""
    proposer = logp_base if rule.propose_from == "base" else logp_rl
    return sampling_log_probs(proposer, rule.temperature, rule.top_p)


def proposal_probs(logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule) -> torch.Tensor:
    """p_prop of `proposal_log_probs`, `[N, V]` float64."""
    return proposal_log_probs(logp_base, logp_rl, rule).to(torch.float64).exp()


def prefix_gate_score(logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule) -> torch.Tensor | None:
    """The criterion's score where it is a function of the prefix alone (entropies, KLs; NaN for
    none/all), `[N]`; None for Δlog p and random, whose scores depend on ŷ or on a draw."""
    if get_criterion(rule.criterion).uses_token or rule.criterion == "random":
        return None
    nothing = torch.zeros(logp_base.shape[0], dtype=torch.long, device=logp_base.device)  # ignored: ŷ and u
    return evaluate_gate(logp_base, logp_rl, nothing, nothing.double(), rule)[0]


def fire_probability(
    logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule, prefix_score: torch.Tensor | None = None
) -> torch.Tensor:
    """G(v) = P(the gate fires | prefix, ŷ = v), `[N, V]` or `[N, 1]` (same for every v) float64.

    Δlog p < τ: 1[Δlog p(v) < τ] (`every_token_delta_logp`); random: P(u < τ) = clip(τ, 0, 1);
    every other criterion: its gate on the prefix's score (`prefix_gate_score`, computed unless
    given), 0 or 1.
    """
    name, n = rule.criterion, logp_base.shape[0]
    if get_criterion(name).uses_token:
        return gate(name, every_token_delta_logp(logp_base, logp_rl, rule), rule.threshold).to(torch.float64)
    if name == "random":
        return torch.full((n, 1), min(max(rule.threshold, 0.0), 1.0), dtype=torch.float64, device=logp_base.device)
    score = prefix_score if prefix_score is not None else prefix_gate_score(logp_base, logp_rl, rule)
    return gate(name, score, rule.threshold).to(torch.float64).unsqueeze(-1)


def fired_proposal_probs(logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule,
                         p_prop: torch.Tensor | None = None) -> torch.Tensor:
    """p_F = law of ŷ given that the gate fired, `[N, V]` float64:  p_F(v) ∝ p_prop(v)·G(v).

    Only `delta_logp` looks at ŷ; every other gate is a function of the prefix (and of an
    independent uniform), so there p_F = p_prop. `p_prop`: `proposal_probs`, when already computed.
    """
    p = p_prop if p_prop is not None else proposal_probs(logp_base, logp_rl, rule)
    p = p * fire_probability(logp_base, logp_rl, rule)
    return p / p.sum(-1, keepdim=True)


def speculative_accept(
    target: torch.Tensor, draft_law: torch.Tensor, draft: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Speculative-sampling acceptance (Leviathan et al. 2023), `[N]`: for draft ~ d (`draft_law`),
    y = draft if u < a = min(1, t(draft)/d(draft)), else y ~ (t − d)₊ with the uniform (u − a)/(1 − a).

        P(y = v) = min(d(v), t(v)) + (1 − Σ_w min(d(w), t(w)))·(t(v) − d(v))₊ / Σ_w (t(w) − d(w))₊
                 = min(d(v), t(v)) + (t(v) − d(v))₊ = t(v),

    and P(y = draft) = Σ_v min(d(v), t(v)) = 1 − TV(d, t): no draw of y ~ t keeps the draft more
    often. target t and draft_law d `[N, V]` (normalised), draft `[N]`, u `[N]` in [0, 1).
    """
    col = draft.unsqueeze(-1)
    t_hat, d_hat = target.gather(-1, col).squeeze(-1), draft_law.gather(-1, col).squeeze(-1)
    u = u.to(torch.float64)
    accept_prob = torch.minimum(t_hat / d_hat, torch.ones_like(t_hat))
    residual = (target - draft_law).clamp(min=0.0)
    u_residual = torch.where(accept_prob < 1, (u - accept_prob) / (1 - accept_prob), torch.zeros_like(u))
    keep = (u < accept_prob) | (residual.sum(-1) <= 0)  # a zero residual means t = d: always keep
    return torch.where(keep, draft, sample_from_probs(residual, u_residual.clamp(0.0, 1.0)))


def resample(
    logp_base: torch.Tensor, logp_rl: torch.Tensor, proposal: torch.Tensor, u_resample: torch.Tensor,
    rule: DecodingRule, p_prop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 3 at N positions where the gate fired on `proposal` ŷ: y ~ q (`resampling_probs`), `[N]`.

    coupling="independent": y = inverse-CDF draw from q with u.
    coupling="maximal": `speculative_accept` with target q and draft ŷ, whose law given that the gate
    fired is p_F (`fired_proposal_probs`): y = ŷ with probability 1 − TV(p_F, q), the most any draw
    of y ~ q keeps ŷ. Where π_RL is close to π_B this is close to 1 for gates that ignore ŷ, so an
    (experimental) speculative draft, which continues with ŷ, is rarely cut; for Δlog p < τ, p_F sits
    where q is small, and little is gained. `p_prop`: `proposal_probs`, when already computed.
    """
    q = resampling_probs(logp_base, logp_rl, rule)
    if rule.coupling == "independent":
        return sample_from_probs(q, u_resample)
    return speculative_accept(q, fired_proposal_probs(logp_base, logp_rl, rule, p_prop), proposal, u_resample)


def gate_and_resample(
    logp_base: torch.Tensor,
    logp_rl: torch.Tensor,
    proposal: torch.Tensor,
    u_gate: torch.Tensor,
    u_resample: torch.Tensor,
    rule: DecodingRule,
) -> StepOutcome:
    """Steps 2 and 3: y = ŷ where g(ŷ) = 0, else y ~ q. Positions are independent (logp_* `[N, V]`,
    proposal/u_* `[N]`); q is only evaluated where the gate fired."""
    score, fired = evaluate_gate(logp_base, logp_rl, proposal, u_gate, rule)
    token = proposal.clone()
    rows = fired.nonzero(as_tuple=True)[0]
    if rows.numel():
        token[rows] = resample(logp_base[rows], logp_rl[rows], proposal[rows], u_resample[rows], rule)
    return StepOutcome(token=token, fired=fired, score=score)


def two_stage_step_all_rows(
    logp_base: torch.Tensor,
    logp_rl: torch.Tensor,
    u_proposal: torch.Tensor,
    u_gate: torch.Tensor,
    u_resample: torch.Tensor,
    rule: DecodingRule,
) -> StepOutcome:
    """`two_stage_step` with fixed shapes and no host synchronisation (CUDA-graph safe):
    y_i = ŷ_i where g_i = 0, else y_i ~ q_i, with the resample drawn at every position and kept
    where the gate fired. Positions are independent and draw from their own uniforms, so tokens,
    flags and scores are `two_stage_step`'s; the price is the resampling work at unfired rows
    (the proposal's nucleus is computed once, for the proposal and for the coupling's p_F)."""
    log_p = proposal_log_probs(logp_base, logp_rl, rule)  # = `propose`'s law
    proposal = sample_from_log_probs(log_p, u_proposal)
    score, fired = evaluate_gate(logp_base, logp_rl, proposal, u_gate, rule)
    if not can_fire(rule.criterion):
        return StepOutcome(token=proposal, fired=fired, score=score)
    resampled = resample(logp_base, logp_rl, proposal, u_resample, rule, p_prop=log_p.to(torch.float64).exp())
    return StepOutcome(token=torch.where(fired, resampled, proposal), fired=fired, score=score)


def two_stage_step(
    logp_base: torch.Tensor,
    logp_rl: torch.Tensor,
    u_proposal: torch.Tensor,
    u_gate: torch.Tensor,
    u_resample: torch.Tensor,
    rule: DecodingRule,
) -> StepOutcome:
    """One full step (propose, gate, resample) for N independent positions."""
    proposer = logp_base if rule.propose_from == "base" else logp_rl
    proposal = propose(proposer, u_proposal, rule)
    return gate_and_resample(logp_base, logp_rl, proposal, u_gate, u_resample, rule)
