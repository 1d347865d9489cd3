"""EXPERIMENTAL: exact speculative rounds for two-model decoding. Slower than step by step on a GPU.

On a measured GPU (an H200 at the 1.5B shape; the numbers are in docs/decoding.md) every mode here
decoded slower than the step-by-step loop of `engine.TwoModelDecoder`. A round adds small kernels and host syncs per token, and the
GPU idles. They are kept, outside the main path, because they are exact and may pay where a
scorer pass is expensive relative to a draft step; opt in with `SpeculativeTwoModelDecoder`
(or `decoding.speculative=true` in the sweep configs).

Decoding runs in rounds. In a round of length k every active sequence

1. drafts k tokens with the proposing model (π_B in Alg. 1), one forward each, exactly as the
   step-by-step loop would sample them: ŷ_{t+j} ~ p_prop(· | x, y_<t, ŷ_t..ŷ_{t+j−1}) with the
   uniform of key (sequence, position t+j, proposal stream). Where the gate reads the proposer
   alone (`criteria.gate_reads`: entropy of the proposer, random, all) it is decided here too;
2. lets the other model (the scorer) process the k inputs in one forward pass: its log-probs at
   all k positions when the gate needs them, else only at the fired positions (for a plain
   lm_head the output projection runs there only). Criterion `none` never fires and needs no
   scorer at all;
3. evaluates the gate (unless decided while drafting), resamples y ~ q at every fired position and
   emits e = ŷ, or y where the gate fired; the round is cut at the first position j* where e ≠ ŷ
   (only possible where the gate fired), e is end-of-sequence, or the length budget is reached.
   e_t..e_{t+j*} are kept.

Why this is exact. The gate at position t depends only on the prefix and on ŷ_t (never on earlier
gate decisions), and every draw is a fixed function of the prefix's distributions and of its
(sequence, position, stream) key (`rng.py`). For j < j* the emitted e_{t+j} equals ŷ_{t+j}, so the
prefix the draft conditioned on at t+j+1 *is* the prefix the step-by-step loop has produced; the
loop would draw the same ŷ_{t+j+1} (same distribution, same uniform), take the same gate decision
and, where it fires, draw the same y (same p_prop, q, ŷ and uniform). So each round produces
exactly the tokens of j*+1 loop steps, for any k (k = 1 *is* the loop, and the draft length may
change from round to round: `draft_len="auto"`).

Cost, and what the speculation buys. With the k-token scoring pass costing c_S(k) and one draft
step c_P (forward and sampling), a round costs k·c_P + c_S(k) and a row gains E[min(G, k)] =
(1 − (1−r)^k)/r tokens, r the per-position rate of cuts: r = (fire rate)·P(y ≠ ŷ | fired). The
resample keeps y = ŷ with probability 1 − TV(p_F, q) (maximal coupling, `sampler.resample`), p_F
the law of ŷ given that the gate fired. For gates that do not look at ŷ (entropies, KLs, random,
all) p_F = p_prop, which is close to q when π_RL is close to π_B: r is far below the fire rate
and long drafts pay. For Δlog p < τ, p_F sits on tokens the scorer gave little mass, y ≠ ŷ nearly
always, and with equal-size models and r ≈ 10% the ratio to single-model decoding is at most
max_k E[min(G,k)]/(k + c_S(k)/c_P) ≈ 0.69 even when c_S(k) = c_P (`speculative_speed_bound`).

Drafting with the other model (`draft_model="scorer"`). Drafts from π_B are cut at rate at least
TV(p_prop, m) per position, m the step's output law m(y) = p_prop(y)(1 − G(y)) + [Σ p_prop G]·q(y)
(G(v) = P(fire | ŷ = v)), and the maximal coupling attains it. For Δlog p < τ the step moves the
fired mass of π_B to π_RL, so m is often closer to π_RL (`benchmarks/bench_draft_stop_rates.py`
prints both TVs for any pair of models; the miniature's pair: docs/benchmarks.md). So the scorer
may draft instead (from its own sampling distribution, stream `rng.STREAM_SCORER_DRAFT`) and the
proposer's one pass over the k drafts verifies them: y ~ m by speculative acceptance, cut at the
first rejection, and the flag, ŷ and score drawn from their law given y (`latent_gate`).
The law is built on the few tokens π_B's nucleus, q or the draft law give mass to, not on the
vocabulary (`step_law(..., draft_log_law)`; draws in token order: the same tokens).
Every position's draws use only its own uniforms, the kept prefix depends only on earlier
positions' draws, so sequences, flags and scores have the step loop's joint law (not its tokens).

KV-cache rollback. Both models receive the same k inputs per round (pending token, d_t..d_{t+k−2}),
so one attention mask describes both caches. Rejected columns stay in the caches but are masked
out (holes); position ids count only kept tokens, so RoPE positions stay contiguous. Caches are
re-packed (kept columns right-aligned, fully empty leading columns dropped) when holes pile up
(`engine.compaction_index`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from verl_ext.core import rng
from verl_ext.core.distributions import log_softmax
from verl_ext.core.sampling import sample_from_log_probs, sample_from_probs
from verl_ext.decoding.criteria import get_criterion
from verl_ext.decoding.engine import EngineStats, TwoModelDecoder, _Batch
from verl_ext.decoding.sampler import (
    DecodingRule,
    StepOutcome,
    evaluate_gate,
    evaluate_gate_on_proposer,
    fire_probability,
    prefix_gate_score,
    proposal_log_probs,
    resample,
    resampling_log_probs,
    resampling_probs,
    sampling_log_probs,
    speculative_accept,
)

DRAFT_MODELS = ("proposer", "scorer")
# Positions whose step law (several [rows, V] float64 tensors) a scorer-drafted round builds at once.
LAW_CHUNK_ROWS = 256


# ----------------------------------------------------------------------------- the step law, for verifying drafts


@dataclass(frozen=True)
class StepLaw:
    """The distributions of one two-stage step at N positions (float64), over W columns: the whole
    vocabulary (`columns` None, column = token id) or, per row, the tokens in `columns`."""

    proposal: torch.Tensor  # [N, W] p_prop
    fired: torch.Tensor  # [N, W] P(ŷ = v, the gate fires) = p_prop(v)·G(v), G(v) = P(fires | ŷ = v)
    kept: torch.Tensor  # [N, W] P(ŷ = v, the gate does not fire) = p_prop(v)·(1 − G(v))
    emitted: torch.Tensor  # [N, W] m(y) = p_prop(y)(1 − G(y)) + [Σ_v p_prop(v) G(v)]·q(y)
    columns: torch.Tensor | None = None  # [N, W] token id of each column
    draft: torch.Tensor | None = None  # [N, W] the law drafts were drawn from, when given
    prefix_score: torch.Tensor | None = None  # [N] `prefix_gate_score`, for criteria that have one

    def token_of(self, column: torch.Tensor) -> torch.Tensor:
        """Token ids of per-row column indices `[N]`."""
        return column if self.columns is None else self.columns.gather(-1, column.unsqueeze(-1)).squeeze(-1)

    def column_of(self, token: torch.Tensor) -> torch.Tensor:
        """Per-row column index of token ids `[N]`, each of which must be one of its row's columns."""
        if self.columns is None:
            return token
        return (self.columns == token.unsqueeze(-1)).to(torch.uint8).argmax(-1)


def support_columns(support: torch.Tensor) -> torch.Tensor:
    """Per row, the token ids where `support` `[N, V]` is True, in increasing order, `[N, W]` with W
    the largest row count; shorter rows are padded with a token outside their support (any token when
    a row's support is the whole vocabulary, which then has no padding)."""
    counts = support.sum(-1)
    rows, cols = support.nonzero(as_tuple=True)  # row-major: ids increase within a row
    starts = torch.cumsum(counts, 0) - counts
    outside = (~support).to(torch.uint8).argmax(-1)
    columns = outside.unsqueeze(-1).repeat(1, int(counts.max().item()) if counts.numel() else 0)
    columns[rows, torch.arange(rows.numel(), device=support.device) - starts[rows]] = cols
    return columns


def step_law(
    logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule,
    draft_log_law: torch.Tensor | None = None, draft_is_resampling: bool = False,
) -> StepLaw:
    """The step's distributions, m being the law of the emitted token (`sampler`'s p(y)).

    Without `draft_log_law`: over the whole vocabulary. With it (log of the law `[N, V]` that drafts
    were drawn from, for verifying them against m): over the tokens where p_prop, q or the draft law
    has mass, the only ones any of them or the acceptance can touch (`support_columns`). In increasing
    token order, so inverse-CDF draws over the columns pick the tokens draws over the vocabulary
    would, from the same float values. `draft_is_resampling`: the draft law *is* q (π_RL drafted,
    replacing exactly), reused rather than recomputed.
    """
    log_p = proposal_log_probs(logp_base, logp_rl, rule)
    prefix_score = prefix_gate_score(logp_base, logp_rl, rule)
    if draft_log_law is None:
        p, g, q = log_p.to(torch.float64).exp(), fire_probability(logp_base, logp_rl, rule, prefix_score), \
            resampling_probs(logp_base, logp_rl, rule)
        columns = draft = None
    else:
        log_q = draft_log_law if draft_is_resampling else resampling_log_probs(logp_base, logp_rl, rule)
        support = (log_p > float("-inf")) | (log_q > float("-inf")) | (draft_log_law > float("-inf"))
        columns = support_columns(support)
        on = lambda t: t.gather(-1, columns)
        p, q, draft = (on(t).to(torch.float64).exp() for t in (log_p, log_q, draft_log_law))
        if get_criterion(rule.criterion).uses_token and not rule.base_top_k_approximation:
            g = fire_probability(on(logp_base), on(logp_rl), rule)  # 1[Δlog p(v) < τ]: elementwise
        else:
            g = fire_probability(logp_base, logp_rl, rule, prefix_score)
            g = g if g.shape[-1] == 1 else on(g)
    kept, fired = p * (1 - g), p * g
    return StepLaw(p, fired, kept, kept + fired.sum(-1, keepdim=True) * q, columns, draft, prefix_score)


def latent_gate(
    law: StepLaw, token: torch.Tensor, u_gate: torch.Tensor, u_proposal: torch.Tensor,
    logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fired, ŷ, score) drawn from their law given the emitted token y ~ m, `[N]` each.

    The step's joint law is P(ŷ = v, no fire, y) = p_prop(v)(1 − G(v))·1[y = v] and P(ŷ = v, fire,
    y) = p_prop(v)G(v)·q(y), so P(fire | y) = 1 − p_prop(y)(1 − G(y))/m(y) and, given a fire, ŷ ~ p_F
    independently of y. fired = u_gate < P(fire | y); ŷ = y, or drawn from p_F with u_proposal;
    for `random` the gate's own uniform is u_gate rescaled into [0, τ) or [τ, 1) accordingly. The
    score is then the criterion's score at ŷ (the law's `prefix_score` where the score ignores ŷ),
    so (y, fired, score) has the step loop's joint law.
    """
    col = law.column_of(token).unsqueeze(-1)
    p_fire = 1 - law.kept.gather(-1, col).squeeze(-1) / law.emitted.gather(-1, col).squeeze(-1)
    u_gate = u_gate.to(torch.float64)
    fired = u_gate < p_fire
    y_hat = torch.where(fired, law.token_of(sample_from_probs(law.fired, u_proposal)), token)
    if rule.criterion == "random":
        tau = min(max(rule.threshold, 0.0), 1.0)
        below = tau * u_gate / p_fire.clamp(min=1e-300)
        above = tau + (1 - tau) * (u_gate - p_fire) / (1 - p_fire).clamp(min=1e-300)
        u_gate = torch.where(fired, below, above).clamp(0.0, 1.0 - 2.0**-53)
    if law.prefix_score is not None:  # the score does not depend on ŷ: the law already holds it
        return fired, y_hat, law.prefix_score
    score, _ = evaluate_gate(logp_base, logp_rl, y_hat, u_gate, rule)
    return fired, y_hat, score


def verify_drafts(
    logp_base: torch.Tensor, logp_rl: torch.Tensor, rule: DecodingRule, draft_log_law: torch.Tensor,
    drafted: torch.Tensor, u_resample: torch.Tensor, u_gate: torch.Tensor, u_proposal: torch.Tensor,
    draft_is_resampling: bool = False,
) -> StepOutcome:
    """One step at N positions whose token was drafted from another law: y ~ m by speculative
    acceptance of the draft (`speculative_accept`, target the step law m on the draft support,
    `step_law(..., draft_log_law)`), then the gate's flag and score given y (`latent_gate`).
    logp_* `[N, V]` (T = 1), draft_log_law `[N, V]`, drafted and the uniforms `[N]`."""
    law = step_law(logp_base, logp_rl, rule, draft_log_law, draft_is_resampling)
    token = law.token_of(speculative_accept(law.emitted, law.draft, law.column_of(drafted), u_resample))
    fired, _, score = latent_gate(law, token, u_gate, u_proposal, logp_base, logp_rl, rule)
    return StepOutcome(token=token, fired=fired, score=score)


# ----------------------------------------------------------------------------- rounds and their cost


@dataclass
class _Draft:
    """What the drafting model produced in one round of k positions (B rows)."""

    inputs: torch.Tensor  # [B, k] tokens fed to both models: pending, ŷ_0 .. ŷ_{k-2}
    proposal: torch.Tensor  # [B, k] the drafted tokens: ŷ_j ~ p_prop (the scorer's own draws when it drafts)
    logp: list[torch.Tensor]  # k × [B, V] the drafting model's log-probs at each position
    mask: torch.Tensor  # [B, L + k] attention mask including the round's k columns
    score: torch.Tensor | None  # [B, k] gate score, when the gate reads only the proposer
    fired: torch.Tensor | None  # [B, k]
    draft_law: torch.Tensor | None = None  # [B, k, V] log of the scorer's sampling law, when it drafts


@dataclass
class _Verdict:
    """The gate at the round's positions and, at the N fired ones (row-major), both log-probs."""

    score: torch.Tensor  # [B, k]
    fired: torch.Tensor  # [B, k] bool
    logp_base: torch.Tensor | None  # [N, V]
    logp_rl: torch.Tensor | None  # [N, V]


@dataclass
class _Settled:
    emitted: torch.Tensor  # [B, k] e_j: ŷ_j, or y_j ~ q where the gate fired
    cut: torch.Tensor  # [B] j*, the last position kept
    mismatch_at_cut: torch.Tensor  # [B] the round stopped because e_{j*} ≠ ŷ_{j*}


def _take(per_col: list[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[i] = per_col[cols[i]][rows[i]], `[N, V]`, without stacking all k columns (k·B·V floats)."""
    out = per_col[0].new_empty((rows.numel(), per_col[0].shape[-1]))
    for j, t in enumerate(per_col):
        sel = (cols == j).nonzero(as_tuple=True)[0]
        if sel.numel():
            out[sel] = t[rows[sel]]
    return out


class _Clock:
    """Wall-clock laps for the adaptive draft length; synchronises a GPU first so its queued work
    counts. Disabled (no syncs, laps of 0) when the draft length is fixed."""

    def __init__(self, device: torch.device, enabled: bool):
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.t = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        if not self.enabled:
            return 0.0
        now = self._now()
        lap, self.t = now - self.t, now
        return lap


def expected_tokens(stop_rate: float, k: int) -> float:
    """Tokens a row gains in a round of k positions when each position stops it with probability r.

    The round keeps positions up to and including the first stop (or all k): E[min(G, k)] with G
    geometric on {1, 2, ...}, = Σ_{j<k} (1−r)^j = (1 − (1−r)^k)/r  (= k at r = 0).
    """
    if stop_rate <= 0:
        return float(k)
    if stop_rate >= 1:
        return 1.0
    # 1 − (1−r)^k = −expm1(k·log1p(−r)): no cancellation for tiny r
    return -math.expm1(k * math.log1p(-stop_rate)) / stop_rate


def speculative_speed_bound(
    stop_rate: float, scoring_cost: float | Mapping[int, float], max_len: int | None = None
) -> tuple[float, int]:
    """max_k E[min(G, k)]/(k + c_k), and its k: the most a round of k draft steps and one scoring pass
    costing c_k draft steps can gain over single-model decoding (one step a token).

    scoring_cost: c for every k ≤ max_len (a k-token pass costing as much as a 1-token one, roughly
    a GPU's case), or {k: c_k} measured per draft length (max_len then unused)."""
    costs = scoring_cost if isinstance(scoring_cost, Mapping) else dict.fromkeys(range(1, max_len + 1), scoring_cost)
    return max((expected_tokens(stop_rate, k) / (k + c), k) for k, c in costs.items())


class AdaptiveDraftLen:
    """Picks k per round to maximise the tokens a row gains per second of decoding.

    For a k already used the rate is measured: g(k)/T(k), weighted means over the rounds of that k
    of the tokens a row kept and of the round's seconds (this sees every cost, including rows that
    fall behind the batch). For an untried k it is predicted, E_r[min(G, k)] / (k·d + s(k)):
    r = rate at which a checked position stops a row (a fired position whose resample differs from
    the draft), weighted over rounds with a prior of `prior_rate` worth `prior_positions`
    positions; d = seconds per draft step; s(k) = the rest of a round (scoring forward, gate,
    resample, bookkeeping), on the least-squares line through the tried k (flat while only one
    was tried). Every `explore_every`-th round uses a neighbour of the best k, so the rates around
    the optimum stay measured as r and the costs drift. k only changes speed, never the tokens
    (every round is exact for any k).
    """

    def __init__(self, max_len: int, *, start: int = 4, decay: float = 0.9, explore_every: int = 6,
                 prior_rate: float = 0.1, prior_positions: float = 20.0):
        self.max_len, self.start = max_len, min(start, max_len)
        self.decay, self.explore_every = decay, explore_every
        self.stops, self.checked = prior_rate * prior_positions, prior_positions
        self.draft_step: float | None = None
        self.rest: dict[int, float] = {}
        self.gain: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.rounds = 0

    @property
    def stop_rate(self) -> float:
        return self.stops / self.checked

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def _rest_time(self, k: int) -> float:
        if k in self.rest:
            return self.rest[k]
        ks = torch.tensor(list(self.rest), dtype=torch.float64)
        ts = torch.tensor(list(self.rest.values()), dtype=torch.float64)
        if len(ks) < 2:
            return float(ts[0])
        slope = float(((ks - ks.mean()) * (ts - ts.mean())).sum() / ((ks - ks.mean()) ** 2).sum())
        return max(float(ts.mean()) + max(slope, 0.0) * (k - float(ks.mean())), 1e-9)

    def predicted_tokens_per_second(self, k: int) -> float:
        return expected_tokens(self.stop_rate, k) / (k * self.draft_step + self._rest_time(k))

    def tokens_per_second(self, k: int) -> float:
        if k in self.seconds:
            return self.gain[k] / max(self.seconds[k], 1e-12)
        return self.predicted_tokens_per_second(k)

    def choose(self) -> int:
        if self.draft_step is None:
            return self.start
        self.rounds += 1
        best = max(range(1, self.max_len + 1), key=self.tokens_per_second)
        if self.rounds % self.explore_every == 0 and self.max_len > 1:
            step = 1 if (self.rounds // self.explore_every) % 2 else -1  # alternate sides
            best = best + step if 1 <= best + step <= self.max_len else best - step
        return best

    def observe(self, k: int, stops: int, checked: int, gain: float, t_draft: float, t_rest: float) -> None:
        """One round of k: `stops` rows cut by a mismatch among `checked` positions that could stop
        a row, `gain` tokens kept per row, its draft and remaining seconds."""
        self.stops = self.decay * self.stops + stops
        self.checked = self.decay * self.checked + checked
        self.draft_step = self._ema(self.draft_step, t_draft / k)
        self.rest[k] = self._ema(self.rest.get(k), t_rest)
        self.gain[k] = self._ema(self.gain.get(k), gain)
        self.seconds[k] = self._ema(self.seconds.get(k), t_draft + t_rest)


# ----------------------------------------------------------------------------- decoder


@dataclass
class SpeculativeStats(EngineStats):
    mismatches: int = 0  # rounds of a row cut where the emitted token differed from the draft
    checked: int = 0  # positions that could have cut a round (all kept ones but a round's last)


class SpeculativeTwoModelDecoder(TwoModelDecoder):
    """EXPERIMENTAL, slower than `TwoModelDecoder` on a measured GPU (module docstring): the step
    loop's decoding in rounds of drafted tokens.

    Arguments as `TwoModelDecoder`, and:
    draft_len: k of the rounds (1 = the step loop's steps); "auto" = chosen every round in
    [1, max_draft_len] from the measured stop rate and costs (`AdaptiveDraftLen`).
    draft_model: which model drafts. "proposer" (default): π_prop drafts and every round is
    token-identical to the step loop. "scorer": the other model drafts from its own sampling
    distribution and the proposer verifies the round against the step's output law m (`step_law`,
    speculative-sampling acceptance), then the gate's flag and ŷ are drawn from their law given the
    emitted token (`latent_gate`): the same law over sequences, flags and scores as the step loop,
    not the same tokens. It cuts fewer rounds when m is closer to π_RL than to π_B, as for
    Δlog p < τ (module docstring). Ignored when nothing can fire.
    """

    def __init__(self, base, rl, rule: DecodingRule, *, draft_len: int | str = 4, max_draft_len: int = 8,
                 draft_model: str = "proposer", **kwargs):
        super().__init__(base, rl, rule, **kwargs)
        if draft_len == "auto":
            if max_draft_len < 1:
                raise ValueError(f"max_draft_len must be >= 1, got {max_draft_len}")
            self.adaptive, self.draft_len = AdaptiveDraftLen(max_draft_len), max_draft_len
        elif isinstance(draft_len, int) and draft_len >= 1:
            self.adaptive, self.draft_len = None, draft_len
        else:
            raise ValueError(f"draft_len must be an int >= 1 or 'auto', got {draft_len!r}")
        if draft_model not in DRAFT_MODELS:
            raise ValueError(f"unknown draft_model {draft_model!r}; valid: {', '.join(DRAFT_MODELS)}")
        self.scorer_drafts = self.scorer is not None and draft_model == "scorer"
        # replacing with π_RL (exact): q is π_RL's sampling law, the very law π_RL drafts from
        self.draft_law_is_q = (self.scorer_drafts and self.scorer is rl and rule.resample_gamma == 0
                               and not rule.base_top_k_approximation)
        # a gate read from the proposer alone is decided while drafting (see the module docstring)
        self.early_gate = self.early_gate and not self.scorer_drafts
        self.stats = SpeculativeStats()

    def _response_width(self) -> int:
        return self.max_new_tokens + self.draft_len  # a round may draft past the budget

    def _step(self, b: _Batch) -> torch.Tensor:
        """One round of k = min(draft length, tokens left) positions; returns the rows that finished."""
        left = self.max_new_tokens - int(b.n_out.min().item())
        k = max(1, min(self._draft_len_now(), left))
        positions = b.n_out[:, None] + torch.arange(k, device=self.device)  # [B, k] positions t..t+k-1
        streams = range(rng.NUM_STREAMS + (1 if self.scorer_drafts else 0))
        u = {s: rng.uniforms(b.keys[:, None], positions, s) for s in streams}
        clock = _Clock(self.device, enabled=self.adaptive is not None)
        draft = self._draft(b, k, u)
        t_draft = clock.lap()
        if self.scorer_drafts:
            verdict, settled = self._verify_scorer_draft(b, draft, u, positions)
        else:
            verdict = self._judge(b, draft, u)
            settled = self._settle(draft, verdict, positions, u[rng.STREAM_RESAMPLE])
        done = self._advance_round(b, verdict, settled, positions)
        # a stop is only possible before the last position (nothing is drafted after it)
        checked = int((settled.cut + 1).clamp(max=k - 1).sum().item())
        stops = int(settled.mismatch_at_cut.sum().item())
        self.stats.checked += checked
        self.stats.mismatches += stops
        if self.adaptive is not None:
            gain = float((settled.cut + 1).double().mean().item())
            self.adaptive.observe(k, stops, checked, gain, t_draft, clock.lap())
        return done

    def _draft_len_now(self) -> int:
        return self.adaptive.choose() if self.adaptive is not None else self.draft_len

    def _draft(self, b: _Batch, k: int, u: dict[int, torch.Tensor]) -> _Draft:
        """k forwards of the drafting model, one token each. The proposer samples ŷ_j as the step loop
        would (same uniform) and decides a gate that reads only itself on the way; the scorer
        (`draft_model="scorer"`) samples from its own sampling distribution with its own stream."""
        mask, inp = b.mask, b.pending
        one = torch.ones((b.size, 1), dtype=mask.dtype, device=self.device)
        model, cache = (self.scorer, b.caches[1]) if self.scorer_drafts else (self.proposer, b.caches[0])
        u_draft = u[rng.STREAM_SCORER_DRAFT if self.scorer_drafts else rng.STREAM_PROPOSAL]
        inputs, proposals, logps, laws, scores, fired = [], [], [], [], [], []
        for j in range(k):
            mask = torch.cat([mask, one], dim=1)
            inputs.append(inp)
            logits = self._forward(model, cache, inp[:, None], mask, (b.n_valid + j)[:, None], keep=1)
            logp = log_softmax(logits[:, -1])
            law = sampling_log_probs(logp, self.rule.temperature, self.rule.top_p)  # `sampler.propose`'s law
            inp = sample_from_log_probs(law, u_draft[:, j])
            if self.scorer_drafts:
                laws.append(law)  # the draft law the verification accepts against
            if self.early_gate:
                score, fire = evaluate_gate_on_proposer(logp, inp, u[rng.STREAM_GATE][:, j], self.rule)
                scores.append(score)
                fired.append(fire)
            proposals.append(inp)
            logps.append(logp)
        self.stats.draft_forwards += k
        stack = lambda xs: torch.stack(xs, dim=1) if xs else None
        return _Draft(
            inputs=stack(inputs), proposal=stack(proposals), logp=logps, mask=mask, score=stack(scores),
            fired=stack(fired), draft_law=stack(laws),
        )

    def _judge(self, b: _Batch, draft: _Draft, u: dict[int, torch.Tensor]) -> _Verdict:
        """The gate at the k positions and both models' log-probs where it fired.

        Three cases: no scorer (criterion `none`, or single-model decoding) -> nothing fires; a gate
        read from the proposer alone was decided while drafting, and the scorer only has to extend its
        cache and give log-probs at the fired positions; otherwise the scorer's log-probs at all k
        positions enter the gate.
        """
        k = draft.proposal.shape[1]
        pos_ids = b.n_valid[:, None] + torch.arange(k, device=self.device)
        if self.scorer is None:
            score = torch.full(draft.proposal.shape, float("nan"), dtype=torch.float32, device=self.device)
            return _Verdict(score, torch.zeros_like(draft.proposal, dtype=torch.bool), None, None)
        self.stats.scoring_forwards += 1
        if self.early_gate:
            rows, cols = draft.fired.nonzero(as_tuple=True)
            logp_score = self._scorer_log_probs_at(b.caches[1], draft.inputs, draft.mask, pos_ids, rows, cols)
            logp_prop = _take(draft.logp, rows, cols)
            return _Verdict(draft.score, draft.fired, *self._as_base_rl(logp_prop, logp_score))
        logits = self._forward(self.scorer, b.caches[1], draft.inputs, draft.mask, pos_ids, keep=k)
        logp_base, logp_rl = self._as_base_rl(torch.stack(draft.logp, dim=1), log_softmax(logits))
        score, fired = evaluate_gate(
            logp_base.flatten(0, 1), logp_rl.flatten(0, 1), draft.proposal.flatten(),
            u[rng.STREAM_GATE].flatten(), self.rule,
        )
        fired = fired.view(-1, k)
        rows, cols = fired.nonzero(as_tuple=True)
        return _Verdict(score.view(-1, k), fired, logp_base[rows, cols], logp_rl[rows, cols])

    def _verify_scorer_draft(self, b: _Batch, draft: _Draft, u: dict[int, torch.Tensor], positions: torch.Tensor):
        """`draft_model="scorer"`: the proposer scores the scorer's k drafts in one pass; each position
        emits y ~ m (the step's output law) by speculative acceptance of the draft, and its gate flag,
        ŷ and score are drawn from their law given y (`latent_gate`)."""
        b_rows, k = draft.proposal.shape
        pos_ids = b.n_valid[:, None] + torch.arange(k, device=self.device)
        self.stats.scoring_forwards += 1
        logits = self._forward(self.proposer, b.caches[0], draft.inputs, draft.mask, pos_ids, keep=k)
        logp_score = torch.stack(draft.logp, dim=1).flatten(0, 1)
        logp_base, logp_rl = self._as_base_rl(log_softmax(logits).flatten(0, 1), logp_score)
        drafted, draft_law = draft.proposal.flatten(), draft.draft_law.flatten(0, 1)
        u_res, u_gate, u_prop = (u[s].flatten() for s in (rng.STREAM_RESAMPLE, rng.STREAM_GATE, rng.STREAM_PROPOSAL))
        emitted, fired, score = torch.empty_like(drafted), torch.empty_like(drafted, dtype=torch.bool), []
        for r in torch.arange(b_rows * k, device=self.device).split(LAW_CHUNK_ROWS):  # a few [rows, V] each
            # the law on the tokens p_prop, q or the draft law give mass to (a few, at top-p < 1)
            out = verify_drafts(logp_base[r], logp_rl[r], self.rule, draft_law[r], drafted[r], u_res[r], u_gate[r],
                                u_prop[r], self.draft_law_is_q)
            emitted[r], fired[r] = out.token, out.fired
            score.append(out.score)
        verdict = _Verdict(torch.cat(score).view(b_rows, k), fired.view(b_rows, k), None, None)
        return verdict, self._cut(emitted.view(b_rows, k), draft.proposal, positions)

    def _cut(self, emitted: torch.Tensor, drafted: torch.Tensor, positions: torch.Tensor) -> _Settled:
        """j*: the first position whose emitted token is not the drafted one, is an end-of-sequence
        token, or uses up the length budget."""
        mismatch = emitted != drafted
        mismatch[:, -1] = False  # nothing was drafted after the last position
        terminal = mismatch | torch.isin(emitted, self.eos) | (positions + 1 >= self.max_new_tokens)
        k = emitted.shape[1]
        cut = torch.where(terminal.any(1), terminal.to(torch.uint8).argmax(1), torch.full_like(positions[:, 0], k - 1))
        return _Settled(emitted, cut, mismatch.gather(1, cut[:, None]).squeeze(1))

    def _settle(self, draft: _Draft, verdict: _Verdict, positions: torch.Tensor, u_res: torch.Tensor) -> _Settled:
        """Emitted tokens e_j (ŷ_j, or y_j ~ q where the gate fired) and the cut j*.

        j* is the first position whose emitted token is not the drafted ŷ_j (only possible where the
        gate fired), is an end-of-sequence token, or uses up the length budget. Positions after a
        fired j with y_j = ŷ_j stay valid: their prefix is the step loop's prefix.
        """
        emitted = draft.proposal.clone()
        rows, cols = verdict.fired.nonzero(as_tuple=True)
        if rows.numel():
            emitted[rows, cols] = resample(
                verdict.logp_base, verdict.logp_rl, draft.proposal[rows, cols], u_res[rows, cols], self.rule
            )
        return self._cut(emitted, draft.proposal, positions)

    def _advance_round(self, b: _Batch, verdict: _Verdict, settled: _Settled, positions: torch.Tensor) -> torch.Tensor:
        """Record positions ≤ j*, mask the rejected cache columns out, move the pending token."""
        k, cut = positions.shape[1], settled.cut
        kept = torch.arange(k, device=self.device)[None, :] <= cut[:, None]  # [B, k]
        b.tokens.scatter_(1, positions, settled.emitted)
        b.fired.scatter_(1, positions, verdict.fired & kept)
        b.scores.scatter_(1, positions, verdict.score.to(b.scores.dtype))
        b.mask = torch.cat([b.mask, kept.to(b.mask.dtype)], dim=1)
        b.n_valid = b.n_valid + cut + 1
        b.n_out = b.n_out + cut + 1
        b.pending = settled.emitted.gather(1, cut[:, None]).squeeze(1)
        self.stats.rounds += 1
        self.stats.row_rounds += b.size
        self.stats.tokens += int(kept.sum().item())
        self.stats.fired += int((verdict.fired & kept).sum().item())
        return torch.isin(b.pending, self.eos) | (b.n_out >= self.max_new_tokens)
