"""Two-model decoding, step by step: continuous batching, one KV cache per model.

Every step, for all active sequences at once (paper Alg. 1 and Eq. 7, `sampler.py`):

1. the proposing model (π_B in Alg. 1, π_RL for the paper's Table 1 variant) reads the pending
   token and ŷ_t ~ p_prop(· | x, y_<t) is drawn with the uniform of key (sequence, position t,
   proposal stream) (`rng.py`);
2. the other model (the scorer) reads the same token; the gate g(ŷ_t) is evaluated on both
   models' log-probs, and where it fires y_t ~ q is drawn (`sampler.gate_and_resample`); else
   y_t = ŷ_t. Criterion `none` never fires and needs no scorer at all. Where the gate reads the
   proposer alone (`criteria.gate_reads`: entropy of the proposer, random, all) it is decided before
   the scorer runs, and the scorer's output projection runs at the fired rows only (for a plain
   lm_head): it still reads every token, to keep its cache whole.

Invariant between steps: a model's cache holds every token of the sequence except the last one
(the *pending* token), which is the input of the next step. Rows are left-padded (attention mask
0); position ids count only kept columns, so RoPE positions stay contiguous.

Continuous batching: finished sequences leave the batch after each step and new prompts are
prefilled and merged (left padding) while the others continue; the caches are re-packed when the
widest row's kept columns fall well below the cache width (pad columns left by rows that
finished). Results do not depend on the batch a sequence ran in: each sequence has its own random
stream, so a request's tokens are a function of (seed, stream id, prompt, rule) alone.

`StaticTwoModelDecoder` (`static.py`) decodes the same steps on static KV caches (a CUDA graph per
step on a GPU). The speculative rounds (`draft_len > 1`, π_RL drafts) live in `experimental.py`:
exact, but slower than this loop on a measured GPU (DESIGN.md §6).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from verl_ext.core import rng
from verl_ext.core.distributions import log_softmax
from verl_ext.core.sampling import left_pad
from verl_ext.decoding.attention import cpu_grouped_query_attention
from verl_ext.decoding.criteria import can_fire
from verl_ext.decoding.sampler import (
    DecodingRule,
    StepOutcome,
    evaluate_gate_on_proposer,
    gate_and_resample,
    gate_reads_proposer_only,
    propose,
    resample,
)


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


def in_request_order(results: Iterable[tuple[int, DecodeResult]], n: int) -> list[DecodeResult]:
    """The (request index, result) pairs of an `iter_generate` (finishing order) as a list in request order."""
    out: list[DecodeResult | None] = [None] * n
    for i, result in results:
        out[i] = result
    return out  # type: ignore[return-value]


@dataclass
class EngineStats:
    rounds: int = 0  # batch steps (a speculative round of `experimental.py` counts once)
    row_rounds: int = 0  # Σ over rounds of the active rows: tokens / row_rounds = tokens a row gains a round
    draft_forwards: int = 0  # one-token forwards of the proposing (drafting) model
    scoring_forwards: int = 0  # forwards of the other model
    prefill_forwards: int = 0
    tokens: int = 0
    fired: int = 0
    compactions: int = 0


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


# ----------------------------------------------------------------------------- engine


class TwoModelDecoder:
    """Decode with a proposing model and a scoring model sharing one tokenizer, one token a step.

    base, rl: causal LMs (transformers) on the same device. `rl=None` runs single-model sampling
    from `base` (criterion must be "none"): the baseline of the benchmark.
    rule: the `DecodingRule` (criterion, τ, replace/extrapolate, γ, proposer, T, top-p, top-k approx).
    max_batch_size: active sequences at most; new prompts are admitted when at least
    `admit_min` slots are free (default a quarter of the batch) or the batch is empty.
    compact_slack: the caches are re-packed when the widest row keeps < 1/(1 + slack) of the columns.
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
        max_batch_size: int = 32,
        admit_min: int | None = None,
        compact_slack: float = 0.5,
    ):
        if rl is None and rule.criterion != "none":
            raise ValueError("single-model decoding (rl=None) needs criterion 'none'")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.base, self.rl, self.rule = base, rl, rule
        swap = rl is not None and rule.propose_from == "rl"
        self.proposer, self.scorer = (rl, base) if swap else (base, rl)
        if not can_fire(rule.criterion):
            self.scorer = None  # `none` never resamples: the tokens are the proposer's alone
        # a gate read from the proposer alone is decided before the scorer runs (module docstring)
        self.early_gate = self.scorer is not None and gate_reads_proposer_only(rule)
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
        return in_request_order(self.iter_generate(requests), len(requests))

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
                done = self._step(batch)
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
        """Extend the scorer's cache by the inputs `[B, k]`; its log-probs at (rows, cols) only, `[N, V]`.

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

    def _response_width(self) -> int:
        """Response positions a row's output buffers hold (a step writes position n_out < budget)."""
        return self.max_new_tokens

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
        width, dev = self._response_width(), self.device
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

    def _step(self, b: _Batch) -> torch.Tensor:
        """One token for every active row (Alg. 1 / Eq. 7); returns the rows that finished."""
        u = [rng.uniforms(b.keys, b.n_out, s) for s in range(rng.NUM_STREAMS)]  # indexed by rng.STREAM_*
        b.mask = torch.cat([b.mask, torch.ones((b.size, 1), dtype=b.mask.dtype, device=self.device)], dim=1)
        inputs, pos_ids = b.pending[:, None], b.n_valid[:, None]
        logp_prop = log_softmax(self._forward(self.proposer, b.caches[0], inputs, b.mask, pos_ids, keep=1)[:, -1])
        self.stats.draft_forwards += 1
        proposal = propose(logp_prop, u[rng.STREAM_PROPOSAL], self.rule)
        return self._advance(b, self._gate_and_resample(b, logp_prop, proposal, u))

    def _gate_and_resample(self, b: _Batch, logp_prop, proposal, u: list[torch.Tensor]) -> StepOutcome:
        """Steps 2 and 3: the scorer reads the pending token, the gate decides, y ~ q where it fired.

        Three cases: no scorer (criterion `none`, or single-model decoding) -> nothing fires; a gate
        read from the proposer alone is decided first, and the scorer's log-probs are needed at the
        fired rows only; otherwise both models' log-probs at every row enter the gate.
        """
        if self.scorer is None:
            score = torch.full(proposal.shape, float("nan"), dtype=torch.float32, device=self.device)
            return StepOutcome(proposal, torch.zeros_like(proposal, dtype=torch.bool), score)
        self.stats.scoring_forwards += 1
        inputs, pos_ids = b.pending[:, None], b.n_valid[:, None]
        if not self.early_gate:
            logits = self._forward(self.scorer, b.caches[1], inputs, b.mask, pos_ids, keep=1)
            logp_base, logp_rl = self._as_base_rl(logp_prop, log_softmax(logits[:, -1]))
            return gate_and_resample(logp_base, logp_rl, proposal, u[rng.STREAM_GATE], u[rng.STREAM_RESAMPLE], self.rule)
        score, fired = evaluate_gate_on_proposer(logp_prop, proposal, u[rng.STREAM_GATE], self.rule)
        rows = fired.nonzero(as_tuple=True)[0]
        logp_score = self._scorer_log_probs_at(b.caches[1], inputs, b.mask, pos_ids, rows, 0)
        token = proposal.clone()
        if rows.numel():
            logp_base, logp_rl = self._as_base_rl(logp_prop[rows], logp_score)
            token[rows] = resample(logp_base, logp_rl, proposal[rows], u[rng.STREAM_RESAMPLE][rows], self.rule)
        return StepOutcome(token, fired, score)

    def _advance(self, b: _Batch, out: StepOutcome) -> torch.Tensor:
        """Record the step's token, flag and score at position n_out; the token becomes pending."""
        at = b.n_out[:, None]
        b.tokens.scatter_(1, at, out.token[:, None])
        b.fired.scatter_(1, at, out.fired[:, None])
        b.scores.scatter_(1, at, out.score.to(b.scores.dtype)[:, None])
        b.n_valid, b.n_out, b.pending = b.n_valid + 1, b.n_out + 1, out.token
        self.stats.rounds += 1
        self.stats.row_rounds += b.size
        self.stats.tokens += b.size
        self.stats.fired += int(out.fired.sum().item())
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
