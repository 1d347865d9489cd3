"""Token-level comparison of a base model π_B and an RLVR model π_RL (DESIGN.md §2).

For every response token y_t of a sequence (prompt x + response y), both models are run
teacher-forced once, and at each position t this module computes, exactly over the full
vocabulary and in float32:

    logp_base   = log π_B(y_t | x, y_<t)
    logp_rl     = log π_RL(y_t | x, y_<t)
    delta_logp  = log π_RL(y_t) − log π_B(y_t)                      (Eq. 1)
    entropy_base, entropy_rl = H(π) = −Σ_v π(v) log π(v)
    kl_rl_base  = KL(π_RL‖π_B) = Σ_v π_RL(v) [log π_RL(v) − log π_B(v)]
    kl_base_rl  = KL(π_B‖π_RL)
    kl_avg      = ½[KL(π_B‖π_RL) + KL(π_RL‖π_B)]                    (the paper's KL criterion)

Memory stays bounded: each model's decoder gives hidden states [tokens, hidden]; the output
head (lm_head) and the softmax are applied to `chunk_size` positions at a time, so the largest
float32 tensors are two [chunk_size, V] logit blocks, never [batch, length, V] for both models.

The per-chunk math is pure (`metrics_from_logits`, `metrics_from_log_probs`); the model side
(`PairScorer`) only produces logits chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from verl_ext.core.distributions import entropy, kl_divergence, log_softmax

METRICS = (
    "logp_base",
    "logp_rl",
    "delta_logp",
    "entropy_base",
    "entropy_rl",
    "kl_rl_base",
    "kl_base_rl",
    "kl_avg",
)


# ----------------------------------------------------------------------------- pure math


def token_log_probs(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(y_t) = logp[t, y_t]: the log-probability of the realised token at each position.

    logp: [n, V] log-probabilities; tokens: [n] integer ids in [0, V).
    """
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def cross_log_prob_sums(logp_pair: torch.Tensor) -> torch.Tensor:
    """C[t, a, b] = Σ_v π_a(v | t) · log π_b(v | t) for a, b ∈ {0, 1}.

    logp_pair: [n, 2, V] finite log-probabilities of two distributions per position. One batched
    matmul gives all four sums: −C[a, a] = H(π_a) and C[a, a] − C[a, b] = KL(π_a‖π_b).
    """
    return torch.matmul(logp_pair.exp(), logp_pair.transpose(-1, -2))


def metrics_from_cross_sums(cross: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropies and KLs from C = `cross_log_prob_sums` (index 0 = π_B, 1 = π_RL).

    H(π_B) = −C[0,0];  H(π_RL) = −C[1,1];
    KL(π_RL‖π_B) = C[1,1] − C[1,0];  KL(π_B‖π_RL) = C[0,0] − C[0,1];  kl_avg = their mean.
    """
    kl_rl_base = cross[:, 1, 1] - cross[:, 1, 0]
    kl_base_rl = cross[:, 0, 0] - cross[:, 0, 1]
    return {
        "entropy_base": -cross[:, 0, 0],
        "entropy_rl": -cross[:, 1, 1],
        "kl_rl_base": kl_rl_base,
        "kl_base_rl": kl_base_rl,
        "kl_avg": 0.5 * (kl_rl_base + kl_base_rl),
    }


def metrics_from_log_probs(
    logp_base: torch.Tensor, logp_rl: torch.Tensor, tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """All METRICS for [n, V] log-probabilities of π_B and π_RL and realised tokens [n].

    Uses `verl_ext.core.distributions` term by term (0·log 0 := 0, KL = +inf where π_a > 0 = π_b),
    so it is exact also for distributions with zero-probability tokens. Δlog p = log π_RL(y_t)
    − log π_B(y_t); H, KL and ½[KL(π_B‖π_RL) + KL(π_RL‖π_B)] as in the module docstring.
    """
    logp_base = logp_base.float()
    logp_rl = logp_rl.float()
    lb, lr = token_log_probs(logp_base, tokens), token_log_probs(logp_rl, tokens)
    kl_rl_base = kl_divergence(logp_rl, logp_base)
    kl_base_rl = kl_divergence(logp_base, logp_rl)
    return {
        "logp_base": lb,
        "logp_rl": lr,
        "delta_logp": lr - lb,
        "entropy_base": entropy(logp_base),
        "entropy_rl": entropy(logp_rl),
        "kl_rl_base": kl_rl_base,
        "kl_base_rl": kl_base_rl,
        "kl_avg": 0.5 * (kl_rl_base + kl_base_rl),
    }


def default_block_rows(device: torch.device | str) -> int:
    """Rows per softmax block: 2 on CPU (a [2, 2, V] float32 block stays in cache), 1024 on GPU."""
    return 2 if torch.device(device).type == "cpu" else 1024


def _fill_metric_blocks(logits_base, logits_rl, tokens, out: dict[str, torch.Tensor], rows: range, block: int) -> None:
    """Write METRICS of rows `rows` into the preallocated `out` tensors, `block` rows at a time."""
    for start in range(rows.start, rows.stop, block):
        sl = slice(start, min(start + block, rows.stop))
        zb, zr, tok = logits_base[sl], logits_rl[sl], tokens[sl]
        logp_pair = log_softmax(torch.stack([zb, zr], dim=1))  # [b, 2, V]
        cross = cross_log_prob_sums(logp_pair)
        if torch.isfinite(cross).all():
            part = metrics_from_cross_sums(cross)
            lb, lr = token_log_probs(logp_pair[:, 0], tok), token_log_probs(logp_pair[:, 1], tok)
            part.update(logp_base=lb, logp_rl=lr, delta_logp=lr - lb)
        else:  # a −inf logit makes 0·(−inf) = NaN in the matmul: redo the block term by term
            part = metrics_from_log_probs(logp_pair[:, 0], logp_pair[:, 1], tok)
        for k in METRICS:
            out[k][sl] = part[k]


def metrics_from_logits(
    logits_base: torch.Tensor,
    logits_rl: torch.Tensor,
    tokens: torch.Tensor,
    block_rows: int | None = None,
    num_threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """All METRICS from raw logits [n, V] of π_B and π_RL (any dtype) and tokens [n].

    log π = log_softmax(z) in float32 (`distributions.log_softmax`); entropies and KLs come from
    the four sums C[a, b] = Σ_v π_a(v) log π_b(v) (`cross_log_prob_sums`), computed `block_rows`
    positions at a time so the working set stays in cache on CPU. The same numbers as
    `metrics_from_log_probs`, in ~4 passes over the vocabulary instead of ~12. A block with a
    −inf logit (masked vocabulary; its sums come out NaN) is redone by `metrics_from_log_probs`.

    On CPU the blocks are shared among `num_threads` Python threads (default: torch's intra-op
    thread count), each running single-threaded torch ops: on cache-sized blocks this avoids a
    thread barrier per op (`benchmarks/bench_token_metrics.py` measures it). torch's thread setting is restored.
    """
    if logits_base.shape != logits_rl.shape:
        raise ValueError(f"logit shapes differ: base {tuple(logits_base.shape)} vs RL {tuple(logits_rl.shape)}")
    if logits_base.dim() != 2 or tokens.shape != logits_base.shape[:1]:
        raise ValueError(
            f"expected logits [n, V] and tokens [n], got {tuple(logits_base.shape)} and {tuple(tokens.shape)}"
        )
    n = logits_base.shape[0]
    block = block_rows or default_block_rows(logits_base.device)
    if block < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    # Results go straight into preallocated outputs: many tiny tensors kept between the large
    # per-block temporaries would fragment the CPU heap and grow the resident memory.
    out = {k: torch.empty(n, dtype=torch.float32, device=logits_base.device) for k in METRICS}
    if logits_base.device.type != "cpu" or n <= block:
        _fill_metric_blocks(logits_base, logits_rl, tokens, out, range(n), block)
        return out
    threads = max(1, min(num_threads or torch.get_num_threads(), -(-n // block)))
    per = -(-n // (threads * block)) * block  # rows per thread, a multiple of the block
    parts = [range(s, min(s + per, n)) for s in range(0, n, per)]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if len(parts) == 1:
            _fill_metric_blocks(logits_base, logits_rl, tokens, out, parts[0], block)
        else:
            with ThreadPoolExecutor(len(parts)) as pool:
                list(pool.map(lambda r: _fill_metric_blocks(logits_base, logits_rl, tokens, out, r, block), parts))
    finally:
        torch.set_num_threads(previous)
    return out


# ----------------------------------------------------------------------------- vocabulary checks


def check_same_tokenizer(base_tokenizer, rl_tokenizer) -> None:
    """Raise ValueError unless both tokenizers map every token string to the same id.

    Δlog p and the KLs compare the two models token by token, so a different vocabulary would
    give numbers that look plausible and mean nothing.
    """
    vb, vr = base_tokenizer.get_vocab(), rl_tokenizer.get_vocab()
    if len(vb) != len(vr):
        only_b = sorted(set(vb) - set(vr))[:5]
        only_r = sorted(set(vr) - set(vb))[:5]
        raise ValueError(
            f"the base and RL tokenizers differ: vocabulary sizes {len(vb)} vs {len(vr)} "
            f"(only in base: {only_b}, only in RL: {only_r}); token-level Δlog p needs one shared tokenizer"
        )
    for token, idx in sorted(vb.items(), key=lambda kv: kv[1]):  # lowest differing id first
        other = vr.get(token)
        if other != idx:
            raise ValueError(
                f"the base and RL tokenizers differ: token {token!r} has id {idx} in base and "
                f"{other} in RL; token-level Δlog p needs one shared tokenizer"
            )


def output_vocab_size(model) -> int:
    """Number of logits the model's output head produces (may exceed len(tokenizer), e.g. Qwen)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_output_vocab(base_model, rl_model) -> int:
    """Both heads must produce the same number of logits; returns that vocabulary size V."""
    vb, vr = output_vocab_size(base_model), output_vocab_size(rl_model)
    if vb != vr:
        raise ValueError(
            f"the base and RL models have different output vocabularies: {vb} vs {vr} logits "
            f"(config.vocab_size {base_model.config.vocab_size} vs {rl_model.config.vocab_size}); "
            "KL over the full vocabulary needs the same tokenizer and head size"
        )
    return vb


# ----------------------------------------------------------------------------- model side


@dataclass(frozen=True)
class SequencePair:
    """One analysed sequence: its prompt and response token ids (the response is scored)."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states [B, L, H] (after the final norm), i.e. the input of lm_head."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def check_head_reproduces_logits(model, input_ids: Sequence[int]) -> None:
    """Raise unless lm_head(final hidden state) equals the model's own logits on `input_ids`.

    Guards the chunked path against models that post-process logits (soft-capping, scaling).
    """
    ids = torch.as_tensor(list(input_ids)[:16], device=model.device).unsqueeze(0)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[0].float()
        mine = model.get_output_embeddings()(final_hidden_states(model, ids, torch.ones_like(ids))[0]).float()
    tol = 1e-4 if ref.dtype == torch.float32 and model.dtype == torch.float32 else 2e-2
    err = (ref - mine).abs().max().item()
    if err > tol * max(1.0, ref.abs().max().item()):
        raise ValueError(
            f"{type(model).__name__}: lm_head(hidden) differs from the model's logits by {err:.3g}; "
            "this model post-processes its logits and is not supported by the chunked scorer"
        )


def _batches(order: list[int], lengths: list[int], max_batch: int, max_tokens: int) -> Iterator[list[int]]:
    """Group indices (sorted by length) into batches of ≤ max_batch sequences and ≤ max_tokens padded tokens."""
    batch: list[int] = []
    for i in order:
        width = max([lengths[j] for j in batch] + [lengths[i]])
        if batch and (len(batch) + 1 > max_batch or width * (len(batch) + 1) > max_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


class PairScorer:
    """Teacher-forced per-token METRICS of response tokens under π_B and π_RL.

    Args:
        base_model, rl_model: causal LMs (transformers) with the same vocabulary, on `device`.
        chunk_size: positions whose logits are materialised at once (peak ≈ 2·chunk_size·V·4 bytes
            plus a block of the softmax).
        batch_size / max_batch_tokens: sequences per decoder forward pass, and their padded size.
        block_rows: rows per softmax block (default: `default_block_rows(device)`).
    """

    def __init__(
        self,
        base_model,
        rl_model,
        *,
        chunk_size: int = 256,
        batch_size: int = 8,
        max_batch_tokens: int = 16384,
        block_rows: int | None = None,
    ):
        for name, value in (
            ("chunk_size", chunk_size),
            ("batch_size", batch_size),
            ("max_batch_tokens", max_batch_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.vocab_size = check_same_output_vocab(base_model, rl_model)
        self.base, self.rl = base_model, rl_model
        self.device = base_model.device
        if rl_model.device != self.device:
            raise ValueError(
                f"both models must be on one device, got base on {self.device} and RL on {rl_model.device}"
            )
        self.chunk_size, self.batch_size, self.max_batch_tokens = chunk_size, batch_size, max_batch_tokens
        self.block_rows = block_rows

    def _check(self, seqs: Sequence[SequencePair]) -> None:
        for i, s in enumerate(seqs):
            if len(s.prompt_ids) == 0:
                raise ValueError(f"sequence {i} has an empty prompt: the first response token needs a context")
            bad = [t for t in list(s.prompt_ids) + list(s.response_ids) if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"sequence {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}")

    @torch.no_grad()
    def score(self, seqs: Sequence[SequencePair], progress=None) -> list[dict[str, torch.Tensor]]:
        """Per sequence, a dict METRIC -> float32 CPU tensor [len(response)] (order of `seqs`)."""
        self._check(seqs)
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: lengths[i])
        results: list[dict[str, torch.Tensor] | None] = [None] * len(seqs)
        for batch in _batches(order, lengths, self.batch_size, self.max_batch_tokens):
            for i, metrics in zip(batch, self._score_batch([seqs[i] for i in batch]), strict=True):
                results[i] = metrics
            if progress is not None:
                progress.update(sum(len(seqs[i].response_ids) for i in batch))
        return results  # type: ignore[return-value]

    def _score_batch(self, seqs: Sequence[SequencePair]) -> list[dict[str, torch.Tensor]]:
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, s in enumerate(seqs):
            full = list(s.prompt_ids) + list(s.response_ids)
            ids[b, : len(full)] = torch.tensor(full)
            mask[b, : len(full)] = 1  # right padding: positions stay 0..len-1
            p, r = len(s.prompt_ids), len(s.response_ids)
            rows += [b] * r
            cols += range(p - 1, p + r - 1)  # the logits at position t predict token t+1
            targets += list(s.response_ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        cols_t = torch.tensor(cols, dtype=torch.long, device=self.device)
        tokens = torch.tensor(targets, dtype=torch.long, device=self.device)
        h_base = final_hidden_states(self.base, ids, mask)[rows_t, cols_t]  # [N, H]
        h_rl = final_hidden_states(self.rl, ids, mask)[rows_t, cols_t]
        flat = {k: torch.empty(len(targets), dtype=torch.float32) for k in METRICS}
        head_b, head_r = self.base.get_output_embeddings(), self.rl.get_output_embeddings()
        for start in range(0, len(targets), self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            out = metrics_from_logits(head_b(h_base[sl]), head_r(h_rl[sl]), tokens[sl], self.block_rows)
            for k in METRICS:
                flat[k][sl] = out[k].cpu()
        splits = [len(s.response_ids) for s in seqs]
        per_seq = {k: torch.split(v, splits) for k, v in flat.items()}
        return [{k: per_seq[k][i] for k in METRICS} for i in range(len(seqs))]


def flatten_metrics(per_sequence: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-sequence metric dicts into one dict of [total tokens] tensors."""
    per_sequence = list(per_sequence)
    if not per_sequence:
        return {k: torch.empty(0) for k in METRICS}
    return {k: torch.cat([m[k] for m in per_sequence]) for k in METRICS}
