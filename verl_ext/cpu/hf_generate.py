"""Batched sampling with a transformers model whose output does not depend on the batch.

Pure torch + transformers (no verl, no Ray): the `hf_reproducible` rollout server calls
`generate_batch`; tests call it directly.

Each sampled token comes with its log-prob under the distribution it was drawn from (vLLM's
"processed" log-probs, `distributions.sampling_log_softmax`):

    log π_s(y) = log nucleus_p( top_k( softmax(z / T) ) )_y

Randomness: row i's t-th token is the inverse-CDF draw at u(key_i, t) (`verl_ext.core.rng`),
so a row draws the same tokens in whatever batch, order or chunk it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from verl_ext.core import rng
from verl_ext.core.distributions import sampling_log_softmax
from verl_ext.core.sampling import left_pad, sample_from_log_probs

# Sampling keys the server accepts only at their no-op value.
_NEUTRAL_PARAMS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0, "n": 1}
_HANDLED_PARAMS = {"temperature", "top_p", "top_k", "max_tokens", "max_new_tokens", "stop_token_ids", "ignore_eos"}
_IGNORED_PARAMS = {"logprobs", "seed", "extra_args", "skip_special_tokens", "spaces_between_special_tokens"}


@dataclass(frozen=True)
class SamplingSpec:
    """One request's sampling parameters (vLLM conventions: temperature 0 = greedy, top_k <= 0 = off).

    `stop_token_ids`: generation stops after emitting one of these (it is kept in the output).
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


def sampling_spec_from(
    params: dict, default_max_tokens: int, eos_token_ids: Sequence[int], max_possible_tokens: int | None = None
) -> SamplingSpec:
    """A `SamplingSpec` from verl's vLLM-style sampling-params dict; any key this backend cannot
    honour (e.g. repetition_penalty=1.2, beam_width) is a ValueError naming it."""
    for key, value in params.items():
        if key in _HANDLED_PARAMS | _IGNORED_PARAMS:
            continue
        if key not in _NEUTRAL_PARAMS or (value is not None and float(value) != _NEUTRAL_PARAMS[key]):
            raise ValueError(
                f"hf_reproducible rollout: unsupported sampling parameter {key}={value!r}; supported: "
                f"{sorted(_HANDLED_PARAMS)} and, at these values only, {_NEUTRAL_PARAMS}"
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
    spec: SamplingSpec,
    pad_token_id: int,
    row_keys: torch.Tensor,
    pad_to: int = 0,
    chunk_rows: int = 0,
    should_abort: Callable[[], bool] | None = None,
) -> list[Generation]:
    """Sample a continuation of every prompt (one forward per new token, KV cache, left padding).

    `row_keys`: [B] int64 stream keys (`rng.sequence_keys`), one per prompt.
    Batch invariance of the log-probs, not only of the tokens: a row's logits depend, in their last
    bits, on the shape of the forward it is part of (the padded width; the matmul split over rows),
    not on the other rows' contents. `pad_to` left-pads to at least that width and `chunk_rows` runs
    exactly that many rows per forward (the last chunk filled with copies of its first row, dropped).
    Finished rows keep being fed until the chunk is done, as `model.generate` does.
    `should_abort()` is polled once per token; True ends every unfinished row with reason "abort".
    """
    from transformers import DynamicCache

    if row_keys.shape != (len(prompts),):
        raise ValueError(f"row_keys has shape {tuple(row_keys.shape)}; expected ({len(prompts)},), one key per prompt")
    if chunk_rows > 0:
        outputs = []
        for start in range(0, len(prompts), chunk_rows):
            n = min(chunk_rows, len(prompts) - start)
            rows = [*range(start, start + n), *[start] * (chunk_rows - n)]
            outputs += generate_batch(
                model, [prompts[i] for i in rows], spec, pad_token_id, row_keys[rows], pad_to, 0, should_abort
            )[:n]
        return outputs
    device = next(model.parameters()).device
    row_keys = row_keys.to(device)
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_token_id, pad_to))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    outputs = [Generation([], [], "length") for _ in prompts]
    done = [False] * len(prompts)
    stop = set(spec.stop_token_ids)
    for step in range(spec.max_tokens):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1, :]
        log_probs = sampling_log_softmax(logits, spec.temperature, spec.top_k, spec.top_p)
        u = rng.uniforms(row_keys, torch.full_like(row_keys, step), rng.STREAM_PROPOSAL)
        tokens = sample_from_log_probs(log_probs, u)
        token_log_probs = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
        for row, (token, lp) in enumerate(zip(tokens.tolist(), token_log_probs.tolist(), strict=True)):
            if not done[row]:
                outputs[row].token_ids.append(token)
                outputs[row].log_probs.append(lp)
                if token in stop:
                    outputs[row].finish_reason, done[row] = "stop", True
        if all(done) or step + 1 == spec.max_tokens:
            break
        if should_abort is not None and should_abort():
            for row in (r for r in range(len(prompts)) if not done[r]):
                outputs[row].finish_reason, done[row] = "abort", True
            break
        input_ids = tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return outputs
