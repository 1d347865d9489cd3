"""Two-model decoding engine: continuous batching, one KV cache per model, exact speculative rounds.

Decoding runs in rounds. In a round of length k every active sequence

1. drafts k tokens with the proposing model (π_B in Alg. 1), one forward each, exactly as the
   step-by-step loop would sample them: ŷ_{t+j} ~ p_prop(· | x, y_<t, ŷ_t..ŷ_{t+j−1}) with the
   uniform of key (sequence, position t+j, proposal stream);
2. lets the other model score all k positions in one forward pass;
3. evaluates the gate at the k positions and cuts the round at the first *terminal* position j*
   (gate fired, end-of-sequence proposed, or the length budget reached): ŷ_t..ŷ_{t+j*−1} are kept
   and position t+j* emits ŷ_{t+j*}, or a token resampled from q where the gate fired there.

Why this is exact. The gate at position t depends only on the prefix and on ŷ_t (never on earlier
gate decisions), and every draw is a fixed function of its (sequence, position, stream) key
(`rng.py`). For j < j* no gate fired, so the prefix the draft conditioned on *is* the prefix the
step-by-step loop would have produced, and the loop would have drawn the same ŷ_{t+j} (same
distribution, same uniform) and taken the same gate decision. At j* both emit the same token. So
each round produces exactly the tokens of j*+1 loop steps; k = 1 *is* the step-by-step loop.

KV-cache rollback. Both models receive the same k inputs per round (pending token, ŷ_t..ŷ_{t+k−2}),
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from verl_ext.decoding import rng
from verl_ext.decoding.sampler import DecodingRule, evaluate_gate, propose, resample
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
    proposer_forwards: int = 0
    scorer_forwards: int = 0
    prefill_forwards: int = 0
    tokens: int = 0
    fired: int = 0
    compactions: int = 0


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


def left_pad(cache: DynamicCache, mask: torch.Tensor, width: int) -> tuple[DynamicCache, torch.Tensor]:
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
        mine = [left_pad(c, self.mask, width) for c in self.caches]
        theirs = [left_pad(c, other.mask, width) for c in other.caches]
        cat = lambda a, b: torch.cat([a, b])
        return _Batch(
            request_idx=self.request_idx + other.request_idx,
            mask=cat(mine[0][1], theirs[0][1]),
            n_valid=cat(self.n_valid, other.n_valid), pending=cat(self.pending, other.pending),
            n_out=cat(self.n_out, other.n_out), keys=cat(self.keys, other.keys),
            tokens=cat(self.tokens, other.tokens), fired=cat(self.fired, other.fired), scores=cat(self.scores, other.scores),
            caches=[_cat_caches(a[0], b[0]) for a, b in zip(mine, theirs)],
        )


# ----------------------------------------------------------------------------- engine


class TwoModelDecoder:
    """Decode with a proposing model and a scoring model sharing one tokenizer.

    base, rl: causal LMs (transformers) on the same device. `rl=None` runs single-model sampling
    from `base` (criterion must be "none"): the baseline of the benchmark.
    rule: the `DecodingRule` (criterion, τ, replace/extrapolate, γ, proposer, T, top-p, top-k approx).
    draft_len: k of the speculative rounds; 1 = the step-by-step loop.
    max_batch_size: active sequences at most; new prompts are admitted when at least
    `admit_min` slots are free (default a quarter of the batch) or the batch is empty.
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
        draft_len: int = 1,
        max_batch_size: int = 32,
        admit_min: int | None = None,
        compact_slack: float = 0.5,
    ):
        if rl is None and rule.criterion != "none":
            raise ValueError("single-model decoding (rl=None) needs criterion 'none'")
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.base, self.rl, self.rule = base, rl, rule
        swap = rl is not None and rule.propose_from == "rl"
        self.proposer, self.scorer = (rl, base) if swap else (base, rl)
        self.models = [m for m in (self.proposer, self.scorer) if m is not None]
        self.device = next(base.parameters()).device
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.draft_len = draft_len
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

    def _prefill(self, reqs: list[Request], idx: list[int]) -> _Batch:
        """Cache every prompt token but the last (the pending token); left padding."""
        n = len(reqs)
        ctx_len = max(len(r.prompt_ids) - 1 for r in reqs)
        ids = torch.full((n, ctx_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, ctx_len), dtype=torch.long)
        for row, r in enumerate(reqs):
            ctx = list(r.prompt_ids[:-1])
            if ctx:
                ids[row, ctx_len - len(ctx) :] = torch.tensor(ctx)
                mask[row, ctx_len - len(ctx) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        caches = [empty_cache(m, n) for m in self.models]
        if ctx_len:
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            for m, c in zip(self.models, caches):
                self._forward(m, c, ids, mask, pos, keep=1)
                self.stats.prefill_forwards += 1
        width = self.max_new_tokens + self.draft_len
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
        """One round of k = min(draft_len, tokens left) positions; returns the rows that finished."""
        rule, dev = self.rule, self.device
        left = self.max_new_tokens - int(b.n_out.min().item())
        k = max(1, min(self.draft_len, left))
        steps = torch.arange(k, device=dev)
        positions = b.n_out[:, None] + steps  # [B, k] response positions t..t+k-1
        keys = b.keys[:, None]

        # 1. draft k tokens with the proposer, exactly as the step loop samples them
        u_prop = rng.uniforms(keys, positions, rng.STREAM_PROPOSAL)
        proposer_cache = b.caches[0]
        mask, inp = b.mask, b.pending
        one = torch.ones((b.size, 1), dtype=mask.dtype, device=dev)
        drafts, draft_logp = [], []
        for j in range(k):
            mask = torch.cat([mask, one], dim=1)
            logits = self._forward(self.proposer, proposer_cache, inp[:, None], mask, (b.n_valid + j)[:, None], keep=1)
            logp = log_softmax(logits[:, -1])
            inp = propose(logp, u_prop[:, j], rule)
            drafts.append(inp)
            draft_logp.append(logp)
        self.stats.proposer_forwards += k
        proposal = torch.stack(drafts, dim=1)  # [B, k]

        # 2. score the k positions with the other model in one forward
        if self.scorer is not None:
            inputs = torch.cat([b.pending[:, None], proposal[:, :-1]], dim=1)
            logits = self._forward(self.scorer, b.caches[1], inputs, mask, b.n_valid[:, None] + steps, keep=k)
            self.stats.scorer_forwards += 1
            logp_prop, logp_score = torch.stack(draft_logp, dim=1), log_softmax(logits)
            logp_base, logp_rl = (logp_prop, logp_score) if self.proposer is self.base else (logp_score, logp_prop)
            u_gate = rng.uniforms(keys, positions, rng.STREAM_GATE)
            score, fired = evaluate_gate(
                logp_base.flatten(0, 1), logp_rl.flatten(0, 1), proposal.flatten(), u_gate.flatten(), rule
            )
            score, fired = score.view(-1, k), fired.view(-1, k)
        else:
            score = torch.full(proposal.shape, float("nan"), dtype=torch.float32, device=dev)
            fired = torch.zeros_like(proposal, dtype=torch.bool)

        # 3. cut at the first terminal position j*: gate fired, EOS proposed, or budget reached
        terminal = fired | torch.isin(proposal, self.eos) | (positions + 1 >= self.max_new_tokens)
        cut = torch.where(terminal.any(1), terminal.to(torch.uint8).argmax(1), torch.full_like(b.n_out, k - 1))
        final = proposal.gather(1, cut[:, None]).squeeze(1)
        fired_at_cut = fired.gather(1, cut[:, None]).squeeze(1)
        rows = fired_at_cut.nonzero(as_tuple=True)[0]
        if rows.numel():
            j = cut[rows]
            u_res = rng.uniforms(b.keys[rows], positions[rows, j], rng.STREAM_RESAMPLE)
            final[rows] = resample(logp_base[rows, j], logp_rl[rows, j], u_res, rule)
        tokens = proposal.scatter(1, cut[:, None], final[:, None])
        kept = steps[None, :] <= cut[:, None]  # [B, k]

        # 4. record, advance, roll back the rejected cache columns (mask them out)
        cols = positions
        b.tokens.scatter_(1, cols, tokens)
        b.fired.scatter_(1, cols, fired & kept)
        b.scores.scatter_(1, cols, score.to(b.scores.dtype))
        b.mask = torch.cat([b.mask, kept.to(b.mask.dtype)], dim=1)
        b.n_valid = b.n_valid + cut + 1
        b.n_out = b.n_out + cut + 1
        b.pending = final
        self.stats.rounds += 1
        self.stats.tokens += int(kept.sum().item())
        self.stats.fired += int((fired & kept).sum().item())
        return torch.isin(final, self.eos) | (b.n_out >= self.max_new_tokens)

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
