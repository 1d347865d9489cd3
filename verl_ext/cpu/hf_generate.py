"""Batched sampling with transformers models, returning the log-prob of every sampled token.

Pure torch + transformers (no verl, no Ray): the `hf` rollout server calls `generate_batch`,
and tests and benchmarks call it directly.

Which log-probs: those of the distribution the token was actually drawn from, i.e. after
temperature, top-k and top-p (vLLM's "processed" log-probs):

    log π_s(y) = log softmax(mask_{k,p}(z / T))_y

where `mask_{k,p}` sets to −inf every logit outside the k largest and outside the smallest set
of most-probable tokens whose probability (after top-k, renormalised) reaches p. With T = 1,
k off and p = 1 this is the model's own log π(y). Greedy decoding (temperature 0) is k = 1: a
point mass, so its log-prob is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from verl_ext.decoding import rng
from verl_ext.decoding.engine import left_pad
from verl_ext.decoding.sampler import sample_from_log_probs

# Sampling keys the server understands; everything else a caller sends must be a no-op value.
_NEUTRAL_PARAMS = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_p": 0.0,
    "n": 1,
}


@dataclass(frozen=True)
class SamplingSpec:
    """Per-request sampling parameters (vLLM conventions: top_k <= 0 or -1 means off).

    Args:
        temperature: T > 0 samples from softmax(z/T); T = 0 is greedy (top_k = 1).
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        top_k: keep the k most probable tokens; <= 0 keeps every token.
        max_tokens: at most this many new tokens.
        stop_token_ids: generation stops after emitting one of these (it is kept in the output).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sampling_spec_from(
    params: dict, default_max_tokens: int, eos_token_ids: Sequence[int], max_possible_tokens: int | None = None
) -> SamplingSpec:
    """Build a `SamplingSpec` from a verl/vLLM-style sampling-params dict.

    Reads temperature, top_p, top_k, max_tokens (or max_new_tokens), stop_token_ids and
    ignore_eos; `logprobs`, `seed` and `extra_args` are accepted and handled by the caller.
    Any other key must hold its neutral value (e.g. repetition_penalty=1.0), else ValueError.
    """
    known = {"temperature", "top_p", "top_k", "max_tokens", "max_new_tokens", "stop_token_ids", "ignore_eos"}
    known |= {"logprobs", "seed", "extra_args", "skip_special_tokens", "spaces_between_special_tokens"}
    for key, value in params.items():
        if key in known:
            continue
        if key not in _NEUTRAL_PARAMS:
            raise ValueError(
                f"hf rollout: unsupported sampling parameter {key!r}={value!r}; supported: {sorted(known)} "
                f"and, at their neutral values, {_NEUTRAL_PARAMS}"
            )
        if value is not None and float(value) != _NEUTRAL_PARAMS[key]:
            raise ValueError(
                f"hf rollout: sampling parameter {key}={value!r} is not supported (only {_NEUTRAL_PARAMS[key]})"
            )
    max_tokens = params.get("max_tokens", params.get("max_new_tokens", default_max_tokens))
    if max_possible_tokens is not None:
        max_tokens = min(max_tokens, max_possible_tokens)
    stop = set(params.get("stop_token_ids") or [])
    if not params.get("ignore_eos", False):
        stop |= set(eos_token_ids)
    top_k = params.get("top_k", -1)
    return SamplingSpec(
        max_tokens=int(max_tokens),
        temperature=float(params.get("temperature", 1.0)),
        top_p=float(params.get("top_p", 1.0)),
        top_k=-1 if top_k is None else int(top_k),
        stop_token_ids=tuple(sorted(stop)),
    )


def sampling_log_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Log-probs [B, V] of the sampling distribution of each row (see the module docstring).

    Args:
        logits: [B, V] raw next-token logits.
        temperature: [B], > 0 (greedy rows are expressed as top_k = 1 with temperature 1).
        top_k: [B] long, number of tokens kept; V (or more) keeps all.
        top_p: [B] nucleus mass in (0, 1].
    """
    scaled = logits.float() / temperature[:, None]
    vocab = scaled.shape[-1]
    if bool((top_k < vocab).any() or (top_p < 1.0).any()):
        # Only the k_max best tokens can survive top-k: sort just those when every row has a k.
        k_max = int(top_k.max())
        if k_max < vocab:
            sorted_logits, order = scaled.topk(k_max, dim=-1, sorted=True)
        else:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(sorted_logits.shape[-1], device=scaled.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most probable token always has 0 before it
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    return scaled.log_softmax(dim=-1)


def _row_params(specs: Sequence[SamplingSpec], vocab: int):
    """Per-row (temperature, top_k, top_p) tensors; greedy rows become top_k = 1, T = 1."""
    temperature = torch.tensor([1.0 if s.greedy else s.temperature for s in specs])
    top_k = torch.tensor([1 if s.greedy else (s.top_k if s.top_k > 0 else vocab) for s in specs])
    top_p = torch.tensor([1.0 if s.greedy else s.top_p for s in specs])
    return temperature, top_k.clamp(max=vocab), top_p


@dataclass
class Generation:
    """One finished sequence: new token ids, their sampling log-probs, and why it stopped."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str  # "stop" (stop token), "length" (max_tokens) or "abort"


@torch.no_grad()
def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    specs: Sequence[SamplingSpec],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    should_abort: Callable[[], bool] | None = None,
    row_keys: torch.Tensor | None = None,
    pad_to: int = 0,
    chunk_rows: int = 0,
) -> list[Generation]:
    """Sample continuations of all `prompts` together (one forward per new token, KV cache).

    Each row has its own sampling spec. Randomness: one `generator` shared by the batch, or, with
    `row_keys` ([B] int64 stream keys of `verl_ext.decoding.rng`), row i's t-th token is the
    inverse-CDF draw at u(key_i, t): the same tokens whatever batch or order the row runs in.
    Batch invariance: a row's logits depend, in their last bits, on the shape of the forward it is
    part of (attention sums over the padded width; matmul kernels and their thread split change
    with the number of rows), not on the other rows' contents. `pad_to` left-pads to at least that
    width and `chunk_rows` runs the batch in chunks of exactly that many rows (the last one filled
    with copies of its first row, discarded): with both fixed, a row's log-probs are bit-identical
    in whatever batch it comes. Rows that finished keep being fed (their outputs are ignored) until
    every row of the chunk is done, as `model.generate` does. `should_abort()` is polled
    once per token; when it returns True every unfinished row ends with reason "abort".
    """
    from transformers import DynamicCache

    if len(prompts) != len(specs):
        raise ValueError(f"got {len(prompts)} prompts but {len(specs)} sampling specs")
    if chunk_rows > 0:
        if row_keys is None:
            raise ValueError("chunk_rows needs row_keys: with one shared generator the chunks would draw differently")
        outputs = []
        for start in range(0, len(prompts), chunk_rows):
            n = min(chunk_rows, len(prompts) - start)
            fill = [start] * (chunk_rows - n)  # copies of the chunk's first row keep its shape fixed
            rows = [*range(start, start + n), *fill]
            outputs += generate_batch(
                model, [prompts[i] for i in rows], [specs[i] for i in rows], pad_token_id,
                should_abort=should_abort, row_keys=row_keys[rows], pad_to=pad_to,
            )[:n]
        return outputs
    device = next(model.parameters()).device
    if row_keys is not None:
        if row_keys.shape != (len(prompts),):
            raise ValueError(
                f"row_keys has shape {tuple(row_keys.shape)}; expected ({len(prompts)},), one key per prompt"
            )
        row_keys = row_keys.to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    temperature, top_k, top_p = (t.to(device) for t in _row_params(specs, vocab))
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_token_id, pad_to))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()

    batch = len(prompts)
    outputs = [Generation([], [], "length") for _ in range(batch)]
    done = [False] * batch
    stop_sets = [set(s.stop_token_ids) for s in specs]
    for step in range(max(s.max_tokens for s in specs)):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        log_probs = sampling_log_probs(out.logits[:, -1, :], temperature, top_k, top_p)
        if row_keys is None:
            tokens = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
        else:
            u = rng.uniforms(row_keys, torch.full_like(row_keys, step), rng.STREAM_PROPOSAL)
            tokens = sample_from_log_probs(log_probs, u)
        token_log_probs = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
        for row, (token, lp) in enumerate(zip(tokens.tolist(), token_log_probs.tolist(), strict=True)):
            if done[row]:
                continue
            outputs[row].token_ids.append(token)
            outputs[row].log_probs.append(lp)
            if token in stop_sets[row]:
                outputs[row].finish_reason, done[row] = "stop", True
            elif len(outputs[row].token_ids) >= specs[row].max_tokens:
                done[row] = True
        if all(done):
            break
        if should_abort is not None and should_abort():
            for row in range(batch):
                if not done[row]:
                    outputs[row].finish_reason, done[row] = "abort", True
            break
        input_ids = tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return outputs
