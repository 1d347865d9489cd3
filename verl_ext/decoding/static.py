"""Two-model decoding with static KV caches and one fixed-shape step, replayed as a CUDA graph on a GPU.

`TwoModelDecoder` (engine.py) grows a DynamicCache per step, builds masks, and picks the fired rows
with `nonzero`: every token launches hundreds of small kernels from Python and waits on the host,
so a GPU idles (a small fraction of the memory roofline: docs/decoding.md). `StaticTwoModelDecoder` decodes the
same step-by-step law with the same random streams, laid out so that the GPU needs no Python per
token:

- Static KV caches, one per model: per layer K, V of shape [slots, H_kv, max_len, d]. Slot s holds
  one sequence; `lengths[s]` = ℓ_s cached tokens, so its next token is written at column ℓ_s and
  attends to columns 0..ℓ_s (`decode_forward`). A finished sequence's slot is refilled with a new
  request (prefill writes its prompt into columns 0..n−2; stale columns beyond are never read).
- One step for all slots (`_pieces`, run by `_run_step`): both models' forwards on the pending tokens, the gate and the
  sampling without data-dependent shapes (`sampler.two_stage_step_all_rows`), and the bookkeeping
  (record token, flag, score at n_out; advance ℓ and n_out; done = EOS or budget reached; finished
  rows are frozen). Its inputs and outputs are static buffers, so on a GPU it is captured once per
  attention width (a few buckets up to max_len) as a `torch.cuda.CUDAGraph` and replayed.
- The host synchronises only every `sync_every` steps (or when a row reaches its length budget,
  which the host knows without asking): it reads which rows finished, hands their results out and
  refills their slots. A row that hit EOS between checks idles, frozen, until the next check.
- Models may sit on one device or on two (a pair of 32B models): on two devices each forward is
  its own graph (the two run concurrently) and the scorer's log-probs are copied to the proposer's
  device for the sampling graph. On a CPU every piece runs eagerly (the fired-rows-only sampler
  `two_stage_step`, whose tokens are those of `two_stage_step_all_rows`).

Same tokens as the step loop. Every draw is keyed by (seed, stream id, response position, purpose)
(`rng.py`) and the sampler is the step loop's, so a request's tokens, flags and scores are those of
`TwoModelDecoder` up to floating-point rounding of the forwards (the static attention
sums over a different number of masked columns): in float32 on a CPU the same tokens, except where
a uniform falls within rounding of a CDF boundary or a score within rounding of τ.

Supported models: Qwen2/Qwen3/Llama/Mistral-style causal LMs (RMSNorm, rotary embeddings, grouped
KV heads, `lm_head(final hidden state)`) without sliding-window layers. Under CUDA graphs the rotary
embedding must be one whose frequencies do not depend on the positions seen (transformers' dynamic
and longrope variants update them on the host).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from verl_ext.core import rng
from verl_ext.core.distributions import log_softmax
from verl_ext.decoding.criteria import can_fire
from verl_ext.decoding.engine import DecodeResult, Request, in_request_order
from verl_ext.decoding.sampler import (
    DecodingRule,
    StepOutcome,
    evaluate_gate_on_proposer,
    gate_reads_proposer_only,
    propose,
    resample,
    two_stage_step,
    two_stage_step_all_rows,
)

SUPPORTED_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})
WIDTH_QUANTUM = 128  # on a GPU, attention widths are rounded up to powers of two times this


# ----------------------------------------------------------------------------- static KV cache


def check_supported(model) -> None:
    """Raise unless `model` is a causal LM whose decode step `decode_forward` reproduces."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"static decoding supports model types {sorted(SUPPORTED_MODEL_TYPES)}, got {cfg.model_type!r}")
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        raise ValueError("static decoding does not support sliding-window attention layers")


@dataclass
class StaticKV:
    """Per layer, keys and values of every slot: [slots, H_kv, max_len, d]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


def allocate_kv(model, slots: int, max_len: int) -> StaticKV:
    """Zero caches for `slots` sequences of up to `max_len` tokens, in the model's dtype and device."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(model.parameters())
    shape = (slots, cfg.num_key_value_heads, max_len, head_dim)
    zeros = lambda: torch.zeros(shape, dtype=p.dtype, device=p.device)
    return StaticKV([zeros() for _ in range(cfg.num_hidden_layers)], [zeros() for _ in range(cfg.num_hidden_layers)])


def _project_qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, d], k and v [B, H_kv, T, d] of x [B, T, D] (with Qwen3's per-head q/k norms)."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """mask[s, 0, 0, j] = (j ≤ ℓ_s), [S, 1, 1, width]: row s's new token at column ℓ_s sees columns 0..ℓ_s."""
    cols = torch.arange(width, device=lengths.device)
    return (cols[None, :] <= lengths[:, None])[:, None, None, :]


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """o_h = Σ_j softmax_j(scale·q_h·k_{g(h), j} + log mask_j) v_{g(h), j} for one query per row.

    q [S, H, 1, d]; keys/values [S, H_kv, W, d] (views of the cache); query head h = g·G + i uses KV
    head g (G = H/H_kv, transformers' `repeat_kv` order). The G query heads of a KV head are laid out
    as G query rows of one head, so the KV heads are read once, never copied. Returns [S, 1, H·d].
    """
    s, h, _, d = q.shape
    out = F.scaled_dot_product_attention(q.reshape(s, keys.shape[1], h // keys.shape[1], d), keys, values,
                                         attn_mask=mask, scale=scale)
    return out.reshape(s, 1, h * d)


def attention_inputs(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, T, d], k and v [B, H_kv, T, d] of decoder `layer` for hidden states h [B, T, D]:
    input RMSNorm, projections, rotary embedding (cos, sin of the positions)."""
    q, k, v = _project_qkv(layer.self_attn, layer.input_layernorm(h))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def attention_output_and_mlp(layer, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h' = h + o_proj(a);  h'' = h' + MLP(RMSNorm(h')): the rest of decoder `layer` after attention."""
    h = h + layer.self_attn.o_proj(a)
    return h + layer.mlp(layer.post_attention_layernorm(h))


_COMPILED: dict = {}


def compiled(fn):
    """`torch.compile(fn, dynamic=False)`, made once per function: fuses the norms, rotary embedding,
    residual adds and activations of a layer into few kernels. Compiled are only the pure parts of
    a layer (`attention_inputs`, `attention_output_and_mlp`); the cache write and the attention stay
    eager, so no cache tensor is a mutated graph input."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def decode_forward(model, kv: StaticKV, tokens: torch.Tensor, lengths: torch.Tensor, width: int,
                   project: bool = True, compile_layers: bool = False) -> torch.Tensor:
    """Logits [S, V] of each slot's next token: token s at position ℓ_s = lengths[s], its keys and
    values written into column ℓ_s of the cache, attending to columns 0..ℓ_s (width ≥ max ℓ + 1 of
    the rows that matter). The transformers modules of `model` do the projections, norms, rotary
    embedding and MLP; only the cache layout and the attention are ours. `project=False`: the final
    hidden states [S, D] instead (logits = `model.lm_head` of them). `compile_layers`: the layers'
    pure parts through `compiled` (same math, other rounding)."""
    body = model.model
    h = body.embed_tokens(tokens[:, None])
    pos = lengths[:, None]
    cos, sin = body.rotary_emb(h, pos)
    mask = attention_mask(lengths, width)
    pre, post = (compiled(attention_inputs), compiled(attention_output_and_mlp)) if compile_layers else \
        (attention_inputs, attention_output_and_mlp)
    for i, layer in enumerate(body.layers):
        q, k, v = pre(layer, h, cos, sin)
        index = pos[:, None, :, None].expand(k.shape)
        kv.keys[i].scatter_(2, index, k)
        kv.values[i].scatter_(2, index, v)
        a = grouped_decode_attention(q, kv.keys[i][:, :, :width], kv.values[i][:, :, :width], mask,
                                     layer.self_attn.scaling)
        h = post(layer, h, a)
    h = body.norm(h)[:, 0]
    return model.lm_head(h) if project else h


def prefill(model, kv: StaticKV, slots: torch.Tensor, tokens: torch.Tensor) -> None:
    """Write the keys and values of `tokens` [R, P] (right-padded; positions 0..P−1) into columns
    0..P−1 of `slots` [R]. Causal attention within each row, so a row's real tokens never see its
    padding; the padding's columns are overwritten by later steps before any row reads them."""
    body = model.model
    h = body.embed_tokens(tokens)
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
    cos, sin = body.rotary_emb(h, pos)
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        q, k, v = _project_qkv(attn, layer.input_layernorm(h))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kv.keys[i][slots, :, : tokens.shape[1]] = k
        kv.values[i][slots, :, : tokens.shape[1]] = v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
        h = h + attn.o_proj(a.transpose(1, 2).reshape(*tokens.shape, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))


def width_buckets(max_len: int, quantum: int = WIDTH_QUANTUM) -> list[int]:
    """Attention widths a GPU captures a step for: quantum·2^j below max_len, then max_len."""
    widths, w = [], quantum
    while w < max_len:
        widths.append(w)
        w *= 2
    return widths + [max_len]


def bucket_for(width: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ width."""
    for b in buckets:
        if b >= width:
            return b
    raise ValueError(f"width {width} exceeds the largest bucket {buckets[-1]}")


# ----------------------------------------------------------------------------- decoder


def capture_graph(device: torch.device, body: Callable[[], None], pool=None) -> tuple[Callable[[], None], object]:
    """Run `body` twice on a side stream of `device` (allocator, cuBLAS workspaces, kernel selection),
    capture it as a `torch.cuda.CUDAGraph` into memory pool `pool` (None: a new one), and return
    (replay, the graph's pool). `replay()` relaunches the captured kernels on `device`'s current
    stream: the same work on the same buffers, with no Python and no host synchronisation."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            body()
        torch.cuda.synchronize(device)

    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return replay, graph.pool()


@dataclass
class StaticStats:
    steps: int = 0  # step replays (every slot advances or idles)
    syncs: int = 0  # host reads of the finished flags
    prefill_forwards: int = 0
    tokens: int = 0
    slot_steps: int = 0  # Σ over steps of the occupied slots: tokens / slot_steps = utilisation
    graphs: int = 0  # captured CUDA graphs


class StaticTwoModelDecoder:
    """Step-by-step two-model decoding (the law and tokens of `TwoModelDecoder`) on
    static KV caches, with a fixed-shape step captured as a CUDA graph on a GPU.

    base, rl, rule, eos_token_ids, pad_token_id, max_new_tokens, seed: as `TwoModelDecoder`
    (`rl=None`: single-model sampling, criterion "none"). The models may sit on different devices.
    max_batch_size: slots decoded together. max_len: cache columns per slot (default: longest
    prompt + max_new_tokens of the first `generate`, grown by later calls as needed).
    sync_every: steps between host reads of the finished flags. cuda_graph: capture the step on a
    GPU ("auto" = whenever the proposer is on CUDA); False runs it eagerly (the same tokens).
    compile_layers: fuse each layer's pure parts with torch.compile (`compiled`; other rounding, so
    the step loop's tokens up to near-ties). Off by default: unmeasured on a GPU so far.
    """

    def __init__(self, base, rl, rule: DecodingRule, *, eos_token_ids: Sequence[int], pad_token_id: int,
                 max_new_tokens: int, seed: int = 0, max_batch_size: int = 32, max_len: int | None = None,
                 sync_every: int = 8, cuda_graph: bool | str = "auto", compile_layers: bool = False):
        if rl is None and rule.criterion != "none":
            raise ValueError("single-model decoding (rl=None) needs criterion 'none'")
        if max_new_tokens < 1 or max_batch_size < 1 or sync_every < 1:
            raise ValueError("max_new_tokens, max_batch_size and sync_every must be >= 1")
        for m in (base, rl):
            if m is not None:
                check_supported(m)
        self.base, self.rl, self.rule = base, rl, rule
        swap = rl is not None and rule.propose_from == "rl"
        self.proposer, self.scorer = (rl, base) if swap else (base, rl)
        if not can_fire(rule.criterion):
            self.scorer = None  # `none` never resamples: the proposer's tokens alone
        self.models = [m for m in (self.proposer, self.scorer) if m is not None]
        self.devices = [next(m.parameters()).device for m in self.models]
        self.device = self.devices[0]
        self.use_graph = self.device.type == "cuda" if cuda_graph == "auto" else bool(cuda_graph)
        if self.use_graph and any(d.type != "cuda" for d in self.devices):
            raise ValueError("cuda_graph needs every model on a CUDA device")
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        self.pad_token_id, self.max_new_tokens, self.seed = pad_token_id, max_new_tokens, seed
        self.slots, self.max_len, self.sync_every = max_batch_size, max_len, sync_every
        self.stats = StaticStats()
        self.compile_layers = compile_layers
        # the sampler: fixed shapes (`two_stage_step_all_rows`) inside a graph, else the fired rows only
        self.sync_free = self.use_graph
        self.split_devices = None  # None: split the step per device when the models' devices differ
        # a gate read from the proposer alone is decided before the scorer's log-probs are needed
        self.early_gate = self.scorer is not None and gate_reads_proposer_only(rule)
        self._kv: list[StaticKV] | None = None
        self._graphs: dict[int, list] = {}

    # ------------------------------------------------------------------ public API

    def generate(self, requests: Sequence[Request]) -> list[DecodeResult]:
        """Results in request order."""
        return in_request_order(self.iter_generate(requests), len(requests))

    @torch.inference_mode()
    def iter_generate(self, requests: Sequence[Request]) -> Iterator[tuple[int, DecodeResult]]:
        """Yield (request index, result) as sequences finish; freed slots are refilled at once."""
        if any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("empty prompt: a request needs at least one prompt token")
        if not requests:
            return
        self._ensure_state(max(len(r.prompt_ids) for r in requests) + self.max_new_tokens)
        queue = list(range(len(requests)))[::-1]
        occupant: list[int | None] = [None] * self.slots  # request index per slot
        host_len = [0] * self.slots  # upper bound of ℓ_s (exact until the row finishes)
        steps_left = [0] * self.slots  # steps until the row's length budget (known on the host)
        since_sync = 0
        while True:
            free = [s for s in range(self.slots) if occupant[s] is None]
            if queue and free:
                take = free[: len(queue)]
                admitted = [queue.pop() for _ in take]
                self._admit(take, [requests[i] for i in admitted])
                for s, i in zip(take, admitted):
                    occupant[s], host_len[s] = i, len(requests[i].prompt_ids) - 1
                    steps_left[s] = self.max_new_tokens
            active = [s for s in range(self.slots) if occupant[s] is not None]
            if not active:
                return
            width = max(host_len[s] for s in active) + 1
            self._run_step(width)
            self.stats.slot_steps += len(active)
            since_sync += 1
            for s in active:
                host_len[s] += 1
                steps_left[s] -= 1
            if since_sync >= self.sync_every or any(steps_left[s] == 0 for s in active):
                since_sync = 0
                for s, result in self._harvest(active):
                    yield occupant[s], result
                    occupant[s] = None

    # ------------------------------------------------------------------ state

    def _ensure_state(self, needed_len: int) -> None:
        """Allocate caches and buffers for `needed_len` columns (and capture the step graphs), unless
        those already allocated are long enough."""
        if self._kv is not None and self._kv[0].max_len >= needed_len:
            return
        max_len = max(needed_len, self.max_len or 0)
        self.max_len = max_len
        s, m, dev = self.slots, self.max_new_tokens + 1, self.device
        self._kv = [allocate_kv(model, s, max_len) for model in self.models]
        z = lambda dtype, *shape, device=dev: torch.zeros(shape, dtype=dtype, device=device)
        self.pending, self.lengths, self.n_out = z(torch.long, s), z(torch.long, s), z(torch.long, s)
        self.keys, self.done = z(torch.long, s), torch.ones(s, dtype=torch.bool, device=dev)  # empty slots: done
        self.out_tokens, self.out_fired, self.out_scores = z(torch.long, s, m), z(torch.bool, s, m), z(torch.float32, s, m)
        vocab = self.proposer.config.vocab_size
        lp_dtype = torch.promote_types(next(self.proposer.parameters()).dtype, torch.float32)  # `log_softmax`'s
        self.logp = [z(lp_dtype, s, vocab, device=d) for d in self.devices]  # each model's log-probs
        self.two_devices = len(self.devices) == 2 and (self.split_devices or self.devices[1] != self.devices[0])
        if self.two_devices:  # the scorer's copies of its inputs, and its log-probs on the sampling device
            self.pending_s, self.lengths_s = z(torch.long, s, device=self.devices[1]), z(torch.long, s, device=self.devices[1])
            self.logp_scorer_here = z(lp_dtype, s, vocab)
        else:
            self.pending_s, self.lengths_s = self.pending, self.lengths
            self.logp_scorer_here = self.logp[-1]
        self._graphs = {}
        self.buckets = width_buckets(max_len, WIDTH_QUANTUM)
        if self.use_graph:
            self._capture_all()

    def _admit(self, slots: list[int], reqs: list[Request]) -> None:
        """Prefill the prompts (all tokens but the last, the pending one) into `slots`; reset their state."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        ctx = [list(r.prompt_ids[:-1]) for r in reqs]
        width = max(len(c) for c in ctx)
        if width:
            ids = torch.full((len(reqs), width), self.pad_token_id, dtype=torch.long)
            for row, c in enumerate(ctx):
                ids[row, : len(c)] = torch.tensor(c, dtype=torch.long)
            for model, kv, dev in zip(self.models, self._kv, self.devices):
                prefill(model, kv, idx.to(dev), ids.to(dev))
                self.stats.prefill_forwards += 1
        put = lambda buf, values: buf.index_copy_(0, idx.to(buf.device), torch.as_tensor(values).to(buf.device, buf.dtype))
        put(self.pending, [r.prompt_ids[-1] for r in reqs])
        put(self.lengths, [len(c) for c in ctx])
        put(self.n_out, [0] * len(reqs))
        put(self.done, [False] * len(reqs))
        put(self.keys, rng.sequence_keys(self.seed, torch.tensor([r.stream_id for r in reqs], device=self.device)))
        if self.two_devices:
            self.pending_s.copy_(self.pending)
            self.lengths_s.copy_(self.lengths)

    def _harvest(self, active: list[int]) -> Iterator[tuple[int, DecodeResult]]:
        """Results of the active slots that finished (one host synchronisation)."""
        self.stats.syncs += 1
        done = self.done.tolist()
        rows = [s for s in active if done[s]]
        if not rows:
            return
        idx = torch.tensor(rows, device=self.device)
        n_out = self.n_out[idx].tolist()
        tokens, fired, scores = (t[idx].tolist() for t in (self.out_tokens, self.out_fired, self.out_scores))
        eos = set(self.eos.tolist())
        for i, s in enumerate(rows):
            n = n_out[i]
            self.stats.tokens += n
            reason = "eos" if tokens[i][n - 1] in eos else "length"
            yield s, DecodeResult(tokens[i][:n], fired[i][:n], scores[i][:n], reason)

    # ------------------------------------------------------------------ the step

    @property
    def projects_fired_rows_only(self) -> bool:
        """Eagerly on one device with a gate read from the proposer alone: the scorer's output
        projection runs at the fired rows only (as in `TwoModelDecoder`), not at every row."""
        return self.early_gate and not (self.sync_free or self.use_graph or self.two_devices)

    def _forward(self, j: int, width: int) -> None:
        """Model j (0 = proposer, 1 = scorer) on the pending tokens: its log-probs into `self.logp[j]`
        (the scorer's final hidden states into `self.hidden_scorer` when it projects fired rows only)."""
        tokens, lengths = (self.pending, self.lengths) if j == 0 else (self.pending_s, self.lengths_s)
        if j == 1 and self.projects_fired_rows_only:
            self.hidden_scorer = decode_forward(self.models[1], self._kv[1], tokens, lengths, width, project=False,
                                                compile_layers=self.compile_layers)
            return
        logits = decode_forward(self.models[j], self._kv[j], tokens, lengths, width, compile_layers=self.compile_layers)
        self.logp[j].copy_(log_softmax(logits))

    def _early_gate_step(self, u: list[torch.Tensor]) -> StepOutcome:
        """`two_stage_step` for a gate read from the proposer alone, with the scorer's log-probs
        computed at the fired rows only (the step loop's early gate: the same values)."""
        logp_prop = self.logp[0]
        proposal = propose(logp_prop, u[0], self.rule)
        score, fired = evaluate_gate_on_proposer(logp_prop, proposal, u[1], self.rule)
        token = proposal.clone()
        rows = fired.nonzero(as_tuple=True)[0]
        if rows.numel():
            logp_score = log_softmax(self.scorer.lm_head(self.hidden_scorer[rows]))
            lb, lr = (logp_prop[rows], logp_score) if self.proposer is self.base else (logp_score, logp_prop[rows])
            token[rows] = resample(lb, lr, proposal[rows], u[2][rows], self.rule)
        return StepOutcome(token=token, fired=fired, score=score)

    def _sample_and_advance(self) -> None:
        """The two-stage step on both log-probs, then the bookkeeping; finished rows stay frozen."""
        u = [rng.uniforms(self.keys, self.n_out, s) for s in (rng.STREAM_PROPOSAL, rng.STREAM_GATE, rng.STREAM_RESAMPLE)]
        logp_prop = self.logp[0]
        if self.scorer is None:  # criterion `none`: the gate never fires, q is never drawn from
            logp_base = logp_rl = logp_prop
        else:
            logp_score = self.logp_scorer_here
            logp_base, logp_rl = (logp_prop, logp_score) if self.proposer is self.base else (logp_score, logp_prop)
        if self.projects_fired_rows_only:
            out = self._early_gate_step(u)
        else:
            step = two_stage_step_all_rows if self.sync_free else two_stage_step
            out = step(logp_base, logp_rl, *u, self.rule)
        score = out.score.to(torch.float32)
        live = ~self.done
        col = self.n_out[:, None]
        self.out_tokens.scatter_(1, col, out.token[:, None])
        self.out_fired.scatter_(1, col, (out.fired & live)[:, None])
        self.out_scores.scatter_(1, col, score[:, None])
        self.pending.copy_(torch.where(live, out.token, self.pending))
        self.lengths.add_(live.long())
        self.n_out.add_(live.long())
        is_eos = (out.token[:, None] == self.eos[None, :]).any(-1)
        self.done.logical_or_(live & (is_eos | (self.n_out >= self.max_new_tokens)))

    def _pieces(self, width: int) -> list:
        """The step as (device, function) pieces in order: proposer forward, scorer forward, sampling."""
        pieces = [(self.devices[0], lambda: self._forward(0, width))]
        if self.scorer is not None:
            pieces.append((self.devices[1], lambda: self._forward(1, width)))
        pieces.append((self.device, self._sample_and_advance))
        if self.two_devices:  # one graph per device: the scorer's piece goes into its own
            return [[pieces[0]], [pieces[1]], [pieces[2]]]
        return [pieces]

    def _run_step(self, width: int) -> None:
        """One step of every slot: the captured graphs of the width's bucket, or the pieces eagerly."""
        self.stats.steps += 1
        if self.use_graph:
            run = self._graphs[bucket_for(width, self.buckets)]
        else:
            run = [lambda group=group: [fn() for _, fn in group] for group in self._pieces(width)]
        if not self.two_devices:
            run[0]()
            return
        run[1]()  # the scorer's device first: on two GPUs both forwards then run at the same time
        run[0]()
        self.logp_scorer_here.copy_(self.logp[1])
        run[2]()
        self.pending_s.copy_(self.pending)
        self.lengths_s.copy_(self.lengths)

    def _capture_all(self) -> None:
        """Capture the step for every width bucket (one graph, or one per device). All slots are empty
        (done, frozen), so the warm-up and capture runs change nothing that a later admission does not
        overwrite. On one device all graphs share one memory pool (they never run at the same time)."""
        pool = None
        for width in self.buckets:
            graphs = []
            for group in self._pieces(width):
                body = lambda group=group: [fn() for _, fn in group]
                replay, graph_pool = capture_graph(group[0][0], body, pool=None if self.two_devices else pool)
                pool = pool if self.two_devices else graph_pool
                graphs.append(replay)
                self.stats.graphs += 1
            self._graphs[width] = graphs
