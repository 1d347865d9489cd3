"""Two-model decoding engine: continuous batching, one KV cache per model, exact speculative rounds.

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
max_k E[min(G,k)]/(k + c_S(k)/c_P) ≈ 0.69 even when c_S(k) = c_P.

Drafting with the other model (`draft_model="scorer"`). Drafts from π_B are cut at rate at least
TV(p_prop, m) per position, m the step's output law m(y) = p_prop(y)(1 − G(y)) + [Σ p_prop G]·q(y)
(G(v) = P(fire | ŷ = v)), and the maximal coupling attains it. For Δlog p < τ the step moves the
fired mass of π_B to π_RL, so m is often closer to π_RL: on the miniature's DAPO model vs its base
at a 10% fire rate, TV(π_B, m) = 0.063 and TV(π_RL, m) = 0.030 per position
(`benchmarks/bench_draft_stop_rates.py` prints both for any pair of models). So the scorer
may draft instead (from its own sampling distribution, stream `rng.STREAM_SCORER_DRAFT`) and the
proposer's one pass over the k drafts verifies them: y ~ m by speculative acceptance, cut at the
first rejection, and the flag, ŷ and score drawn from their law given y (`sampler.latent_gate`).
The law is built on the few tokens π_B's nucleus, q or the draft law give mass to, not on the
vocabulary (`sampler.step_law(..., draft_log_law)`; draws in token order: the same tokens).
Every position's draws use only its own uniforms, the kept prefix depends only on earlier
positions' draws, so sequences, flags and scores have the step loop's joint law (not its tokens).

KV-cache rollback. Both models receive the same k inputs per round (pending token, d_t..d_{t+k−2}),
so one attention mask describes both caches. Rejected columns stay in the caches but are masked
out (holes); position ids count only kept tokens, so RoPE positions stay contiguous. Caches are
re-packed (kept columns right-aligned, fully empty leading columns dropped) when holes pile up.

Invariant between rounds: a model's cache holds every token of the sequence except the last one
(the *pending* token), which is the first input of the next round.

Continuous batching: finished sequences leave the batch after each round and new prompts are
prefilled and merged (left padding) while the others continue. Results do not depend on the batch
a sequence ran in: each sequence has its own random stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from verl_ext.decoding import rng
from verl_ext.decoding.attention import cpu_grouped_query_attention
from verl_ext.decoding.criteria import can_fire
from verl_ext.decoding.sampler import (
    DecodingRule,
    evaluate_gate,
    evaluate_gate_on_proposer,
    gate_reads_proposer_only,
    resample,
    sample_from_log_probs,
    sampling_log_probs,
    verify_drafts,
)
from verl_ext.distributions import log_softmax


@dataclass(frozen=True)
class Request:
    """One sequence to generate: prompt token ids and its random-stream id (e.g. problem·n + sample)."""

    prompt_ids: Sequence[int]
    stream_id: int


@dataclass
class DecodeResult:
    """A finished sequence: response tokens and, per token, whether the gate fired and its score."""

    tokens: list[int]
    replaced: list[bool]
    scores: list[float]
    finish_reason: str  # "eos" | "length"

    @property
    def replace_ratio(self) -> float:
        """Fraction of this response's decoding steps where the gate fired."""
        return sum(self.replaced) / max(len(self.replaced), 1)


@dataclass
class EngineStats:
    rounds: int = 0
    row_rounds: int = 0  # Σ over rounds of the active rows: tokens / row_rounds = tokens a row gains a round
    draft_forwards: int = 0  # one-token forwards of the drafting model
    scoring_forwards: int = 0  # k-token passes of the other model
    prefill_forwards: int = 0
    tokens: int = 0
    fired: int = 0
    mismatches: int = 0  # rounds of a row cut where the emitted token differed from the draft
    checked: int = 0  # positions that could have cut a round (all kept ones but a round's last)
    compactions: int = 0


DRAFT_MODELS = ("proposer", "scorer")
# Positions whose step law (several [rows, V] float64 tensors) a scorer-drafted round builds at once.
LAW_CHUNK_ROWS = 256

# Architectures whose causal-LM logits are exactly lm_head(final hidden state): no soft-capping or
# logit scaling, so the scorer may project only the positions it needs.
_PLAIN_LM_HEAD = frozenset({"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral"})


def replace_ratio(results: Iterable[DecodeResult]) -> float:
    """Replace ratio = mean over responses of the per-response fraction of fired steps."""
    ratios = [r.replace_ratio for r in results]
    return sum(ratios) / len(ratios) if ratios else float("nan")


# ----------------------------------------------------------------------------- KV caches


def _kv_shape(model) -> tuple[int, int, int]:
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def empty_cache(model, batch: int) -> DynamicCache:
    """A DynamicCache holding zero columns for `batch` rows."""
    layers, heads, head_dim = _kv_shape(model)
    p = next(model.parameters())
    z = torch.zeros(batch, heads, 0, head_dim, dtype=p.dtype, device=p.device)
    return DynamicCache(ddp_cache_data=[(z, z) for _ in range(layers)])


def _map_cache(cache: DynamicCache, fn) -> DynamicCache:
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
    return cache


def _cat_caches(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    for la, lb in zip(a.layers, b.layers):
        la.keys, la.values = torch.cat([la.keys, lb.keys]), torch.cat([la.values, lb.values])
    return a


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


def left_pad_cache(cache: DynamicCache, mask: torch.Tensor, width: int) -> tuple[DynamicCache, torch.Tensor]:
    """Add masked-out columns on the left so the cache is `width` columns wide."""
    extra = width - mask.shape[1]
    if extra <= 0:
        return cache, mask
    return _map_cache(cache, lambda t: F.pad(t, (0, 0, extra, 0))), F.pad(mask, (extra, 0))


def compaction_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the column indices that move its kept columns to the right end, in order: [B, L'].

    A stable sort of the 0/1 mask puts a row's holes first and its kept columns last; L' is the
    largest number of kept columns in a row.
    """
    order = torch.sort(mask, dim=1, stable=True).indices
    width = int(mask.sum(1).max().item()) if mask.numel() else 0
    return order[:, mask.shape[1] - width :]


def compact(cache: DynamicCache, mask: torch.Tensor, index: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Gather `index` columns (see `compaction_index`) of every layer and of the mask."""

    def take(t):
        idx = index[:, None, :, None].expand(t.shape[0], t.shape[1], index.shape[1], t.shape[3])
        return t.gather(2, idx)

    return _map_cache(cache, take), mask.gather(1, index)


# ----------------------------------------------------------------------------- batch state


@dataclass
class _Batch:
    """Device state of the active sequences (row i of every tensor is one sequence)."""

    request_idx: list[int]
    mask: torch.Tensor  # [B, L] 1 = a kept cache column
    n_valid: torch.Tensor  # [B] kept columns = position id of the pending token
    pending: torch.Tensor  # [B] last accepted token, not yet in the caches
    n_out: torch.Tensor  # [B] response tokens so far
    keys: torch.Tensor  # [B] random-stream roots
    tokens: torch.Tensor  # [B, W] response tokens (valid up to n_out)
    fired: torch.Tensor  # [B, W]
    scores: torch.Tensor  # [B, W]
    caches: list[DynamicCache] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.request_idx)

    def select(self, rows: torch.Tensor) -> _Batch:
        keep = rows.tolist()
        pick = lambda t: t.index_select(0, rows)
        return _Batch(
            request_idx=[self.request_idx[i] for i in keep],
            mask=pick(self.mask), n_valid=pick(self.n_valid), pending=pick(self.pending), n_out=pick(self.n_out),
            keys=pick(self.keys), tokens=pick(self.tokens), fired=pick(self.fired), scores=pick(self.scores),
            caches=[_map_cache(c, pick) for c in self.caches],
        )

    def merge(self, other: _Batch) -> _Batch:
        width = max(self.mask.shape[1], other.mask.shape[1])
        mine = [left_pad_cache(c, self.mask, width) for c in self.caches]
        theirs = [left_pad_cache(c, other.mask, width) for c in other.caches]
        cat = lambda a, b: torch.cat([a, b])
        return _Batch(
            request_idx=self.request_idx + other.request_idx,
            mask=cat(mine[0][1], theirs[0][1]),
            n_valid=cat(self.n_valid, other.n_valid), pending=cat(self.pending, other.pending),
            n_out=cat(self.n_out, other.n_out), keys=cat(self.keys, other.keys),
            tokens=cat(self.tokens, other.tokens), fired=cat(self.fired, other.fired), scores=cat(self.scores, other.scores),
            caches=[_cat_caches(a[0], b[0]) for a, b in zip(mine, theirs)],
        )


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


# ----------------------------------------------------------------------------- engine


class TwoModelDecoder:
    """Decode with a proposing model and a scoring model sharing one tokenizer.

    base, rl: causal LMs (transformers) on the same device. `rl=None` runs single-model sampling
    from `base` (criterion must be "none"): the baseline of the benchmark.
    rule: the `DecodingRule` (criterion, τ, replace/extrapolate, γ, proposer, T, top-p, top-k approx).
    draft_len: k of the speculative rounds; 1 = the step-by-step loop; "auto" = chosen every round
    in [1, max_draft_len] from the measured stop rate and costs (`AdaptiveDraftLen`).
    max_batch_size: active sequences at most; new prompts are admitted when at least
    `admit_min` slots are free (default a quarter of the batch) or the batch is empty.
    draft_model: which model drafts the speculative rounds. "proposer" (default): π_prop drafts and
    every round is token-identical to the step loop. "scorer": the other model drafts from its own
    sampling distribution and the proposer verifies the round against the step's output law m
    (`sampler.step_law`, speculative-sampling acceptance), then the gate's flag and ŷ are drawn from
    their law given the emitted token (`sampler.latent_gate`): the same law over sequences, flags
    and scores as the step loop, not the same tokens. It cuts fewer rounds when m is closer to π_RL
    than to π_B, as for Δlog p < τ (see the module docstring). Ignored when nothing can fire.
    """

    def __init__(
        self,
        base,
        rl,
        rule: DecodingRule,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_new_tokens: int,
        seed: int = 0,
        draft_len: int | str = 1,
        max_draft_len: int = 8,
        max_batch_size: int = 32,
        admit_min: int | None = None,
        compact_slack: float = 0.5,
        draft_model: str = "proposer",
    ):
        if rl is None and rule.criterion != "none":
            raise ValueError("single-model decoding (rl=None) needs criterion 'none'")
        if draft_len == "auto":
            if max_draft_len < 1:
                raise ValueError(f"max_draft_len must be >= 1, got {max_draft_len}")
            self.adaptive, self.draft_len = AdaptiveDraftLen(max_draft_len), max_draft_len
        elif isinstance(draft_len, int) and draft_len >= 1:
            self.adaptive, self.draft_len = None, draft_len
        else:
            raise ValueError(f"draft_len must be an int >= 1 or 'auto', got {draft_len!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if draft_model not in DRAFT_MODELS:
            raise ValueError(f"unknown draft_model {draft_model!r}; valid: {', '.join(DRAFT_MODELS)}")
        self.base, self.rl, self.rule = base, rl, rule
        swap = rl is not None and rule.propose_from == "rl"
        self.proposer, self.scorer = (rl, base) if swap else (base, rl)
        if not can_fire(rule.criterion):
            self.scorer = None  # `none` never resamples: the tokens are the proposer's alone
        self.scorer_drafts = self.scorer is not None and draft_model == "scorer"
        # replacing with π_RL (exact): q is π_RL's sampling law, the very law π_RL drafts from
        self.draft_law_is_q = (self.scorer_drafts and self.scorer is rl and rule.resample_gamma == 0
                               and not rule.base_top_k_approximation)
        # a gate read from the proposer alone is decided while drafting (see the module docstring)
        self.early_gate = self.scorer is not None and not self.scorer_drafts and gate_reads_proposer_only(rule)
        self.models = [m for m in (self.proposer, self.scorer) if m is not None]
        self.device = next(base.parameters()).device
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.max_batch_size = max_batch_size
        self.admit_min = admit_min if admit_min is not None else max(1, max_batch_size // 4)
        self.compact_slack = compact_slack
        self.stats = EngineStats()

    # ------------------------------------------------------------------ public API

    def generate(self, requests: Sequence[Request]) -> list[DecodeResult]:
        """Results in request order."""
        out: list[DecodeResult | None] = [None] * len(requests)
        for i, result in self.iter_generate(requests):
            out[i] = result
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def iter_generate(self, requests: Sequence[Request]) -> Iterator[tuple[int, DecodeResult]]:
        """Yield (request index, result) as sequences finish (continuous batching)."""
        for r in requests:
            if len(r.prompt_ids) == 0:
                raise ValueError("empty prompt: a request needs at least one prompt token")
        queue = list(range(len(requests)))[::-1]
        batch: _Batch | None = None
        while queue or (batch is not None and batch.size):
            free = self.max_batch_size - (batch.size if batch is not None else 0)
            with cpu_grouped_query_attention(self.models):  # rows attend through masks (see attention.py)
                if queue and (free >= min(self.admit_min, len(queue)) or batch is None or batch.size == 0):
                    take = [queue.pop() for _ in range(min(free, len(queue)))]
                    new = self._prefill([requests[i] for i in take], take)
                    batch = new if batch is None or batch.size == 0 else batch.merge(new)
                done = self._round(batch)
            if bool(done.any()):
                yield from self._finished(batch, done)
                batch = batch.select((~done).nonzero(as_tuple=True)[0])
            batch = self._maybe_compact(batch)

    # ------------------------------------------------------------------ internals

    def _forward(self, model, cache, input_ids, mask, position_ids, keep: int) -> torch.Tensor:
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=keep,
        )
        return out.logits

    def _scorer_log_probs_at(self, cache, inputs, mask, position_ids, rows, cols) -> torch.Tensor:
        """Extend the scorer's cache by the round's k inputs; its log-probs at (rows, cols) only, `[N, V]`.

        For architectures whose logits are `lm_head(last hidden state)` the output projection (B·k·V
        multiply-adds, as much as the whole body of a small model) runs on the N fired positions only.
        """
        if self.scorer.config.model_type not in _PLAIN_LM_HEAD:
            logits = self._forward(self.scorer, cache, inputs, mask, position_ids, keep=inputs.shape[1])
            return log_softmax(logits[rows, cols])
        out = self.scorer.get_decoder()(
            input_ids=inputs, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True,
        )
        return log_softmax(self.scorer.get_output_embeddings()(out.last_hidden_state[rows, cols]))

    def _as_base_rl(self, logp_prop, logp_score):
        """(log π_B, log π_RL) from (proposer's, scorer's) log-probs."""
        return (logp_prop, logp_score) if self.proposer is self.base else (logp_score, logp_prop)

    def _prefill(self, reqs: list[Request], idx: list[int]) -> _Batch:
        """Cache every prompt token but the last (the pending token); left padding."""
        n = len(reqs)
        ids, mask = left_pad([r.prompt_ids[:-1] for r in reqs], self.pad_token_id, allow_empty=True)
        ids, mask, ctx_len = ids.to(self.device), mask.to(self.device), ids.shape[1]
        caches = [empty_cache(m, n) for m in self.models]
        if ctx_len:
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            for m, c in zip(self.models, caches):
                self._forward(m, c, ids, mask, pos, keep=1)
                self.stats.prefill_forwards += 1
        width = self.max_new_tokens + self.draft_len  # a round may draft past the budget
        dev = self.device
        return _Batch(
            request_idx=list(idx),
            mask=mask,
            n_valid=mask.sum(1),
            pending=torch.tensor([r.prompt_ids[-1] for r in reqs], dtype=torch.long, device=dev),
            n_out=torch.zeros(n, dtype=torch.long, device=dev),
            keys=rng.sequence_keys(self.seed, torch.tensor([r.stream_id for r in reqs], device=dev)),
            tokens=torch.zeros((n, width), dtype=torch.long, device=dev),
            fired=torch.zeros((n, width), dtype=torch.bool, device=dev),
            scores=torch.zeros((n, width), dtype=torch.float32, device=dev),
            caches=caches,
        )

    def _round(self, b: _Batch) -> torch.Tensor:
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
        done = self._advance(b, verdict, settled, positions)
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
        ŷ and score are drawn from their law given y (`sampler.latent_gate`)."""
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

    def _advance(self, b: _Batch, verdict: _Verdict, settled: _Settled, positions: torch.Tensor) -> torch.Tensor:
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

    def _finished(self, b: _Batch, done: torch.Tensor) -> Iterator[tuple[int, DecodeResult]]:
        rows = done.nonzero(as_tuple=True)[0]
        n_out = b.n_out[rows].tolist()
        tokens, fired, scores = b.tokens[rows].tolist(), b.fired[rows].tolist(), b.scores[rows].tolist()
        for i, row in enumerate(rows.tolist()):
            n = n_out[i]
            reason = "eos" if tokens[i][n - 1] in self.eos.tolist() else "length"
            yield b.request_idx[row], DecodeResult(tokens[i][:n], fired[i][:n], scores[i][:n], reason)

    def _maybe_compact(self, b: _Batch) -> _Batch:
        """Re-pack the caches when the widest row keeps < 1/(1+slack) of the columns."""
        if b.size == 0:
            return b
        width, kept = b.mask.shape[1], int(b.n_valid.max().item())
        if width <= math.ceil(kept * (1 + self.compact_slack)) + 8:
            return b
        index = compaction_index(b.mask)
        for c in b.caches:
            compact(c, b.mask, index)
        b.mask = b.mask.gather(1, index)
        self.stats.compactions += 1
        return b
