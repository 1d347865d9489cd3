"""Batched sampling of responses, shared by evaluation and the Δlog p analysis.

- `format_problem` / `problem_to_messages` / `encode_problem`: the paper's prompt, the problem
  followed by "Please reason step by step, and put your final answer within \\boxed{}." in the
  model's chat template.
- `sample_responses(model, tokenizer, prompts, n, ...)`: `n` samples per prompt (token ids in,
  `Generation`s out, ordered by prompt then sample), with transformers (`backend="hf"`, batched
  with left padding, stops at end-of-sequence) or vLLM (`backend="vllm"`, imported lazily; on a
  machine without a GPU, vLLM's CPU build: `verl_ext.vllm_cpu`). `backend="auto"` picks vLLM
  wherever it is installed, CPU included.

Sampling is exactly temperature / top-p / top-k as given: the model's own generation defaults
(repetition penalty, top-k 50, ...) are not applied.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from verl_ext.core.models import cut_at_eos, eos_token_ids, load_hf_model, resolve_device

BACKENDS = ("hf", "vllm", "auto")


@dataclass
class Generation:
    """One sampled response. `response_ids` include the end-of-sequence token when one was produced."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    finish_reason: str  # "stop" (end-of-sequence) or "length" (max_new_tokens reached)
    # vLLM: log π(y_t | x, y_<t) of each response token under the model's own distribution (before
    # temperature / top-k / top-p: vLLM's raw log-probs); None from the hf backend
    response_log_probs: list[float] | None = None


# ----------------------------------------------------------------------------- validation


def check_sampling_args(n: int, temperature: float, top_p: float, top_k: int, max_new_tokens: int, batch_size: int) -> None:
    """Raise ConfigError (a ValueError) naming the first invalid argument, its value and the valid range
    (`verl_ext.core.checks.check_sampling`: NaN and infinities are refused too)."""
    from verl_ext.core.checks import check_sampling

    check_sampling({"n": n, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                    "max_new_tokens": max_new_tokens, "batch_size": batch_size}, "sampling")


def resolve_backend(backend: str) -> str:
    """"hf" | "vllm" as given; "auto" -> "vllm" wherever vLLM is installed (its CPU build included), else "hf"."""
    from verl_ext.vllm_cpu import vllm_usable

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid; valid choices: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "vllm" if vllm_usable() else "hf"


# ----------------------------------------------------------------------------- sampling


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    n: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 32,
    backend: str = "hf",
    device: Any = None,
    show_progress: bool = True,
) -> list[Generation]:
    """`n` samples for each prompt (token ids), ordered by (prompt_index, sample_index).

    `model` is a loaded model (a transformers causal LM for "hf", a `vllm.LLM` for "vllm") or a
    path / hub id to load. `tokenizer` may be None when `model` is a path (loaded from it).
    Deterministic for a fixed seed, batch size, backend and device. `temperature=0` is greedy.
    """
    check_sampling_args(n, temperature, top_p, top_k, max_new_tokens, batch_size)
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    backend = resolve_backend(backend)
    if tokenizer is None:
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError("tokenizer is None: give a tokenizer, or pass the model as a path to load both")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model))
    args = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed}
    if backend == "vllm":
        return _sample_vllm(model, tokenizer, prompts, n, show_progress=show_progress, **args)
    return _sample_hf(model, tokenizer, prompts, n, batch_size=batch_size, device=device, show_progress=show_progress, **args)


def _sample_hf(model, tokenizer, prompts, n, *, temperature, top_p, top_k, max_new_tokens, seed, batch_size, device,
               show_progress):
    import torch
    from transformers import GenerationConfig

    from verl_ext.core.sampling import left_pad

    if isinstance(model, (str, os.PathLike)):
        model = load_hf_model(model, device)
    elif device is not None:
        model = model.to(resolve_device(device))
    model.eval()
    run_device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else float(temperature),
        top_p=None if greedy else float(top_p),
        top_k=0 if greedy or top_k == -1 else int(top_k),
        min_p=None if greedy else 0.0,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    # Similar lengths together (less padding); the order, hence the result, depends only on the inputs.
    jobs = sorted(((p, s) for p in range(len(prompts)) for s in range(n)), key=lambda j: (-len(prompts[j[0]]), j))
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(jobs), desc="sampling", unit="response")
    results: dict[tuple[int, int], Generation] = {}
    fork_devices = [run_device] if run_device.type == "cuda" else []
    started = time.monotonic()
    for b, batch in enumerate(batches):
        input_ids, mask = (t.to(run_device) for t in left_pad([prompts[p] for p, _ in batch], pad_id))
        with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
            torch.manual_seed(seed * 1_000_003 + b)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        for row, (p, s) in enumerate(batch):
            response, reason = cut_at_eos(out[row, input_ids.shape[1] :].tolist(), eos_ids)
            results[(p, s)] = Generation(
                prompt_index=p,
                sample_index=s,
                prompt_ids=list(prompts[p]),
                response_ids=response,
                response_text=tokenizer.decode(response, skip_special_tokens=True),
                finish_reason=reason,
            )
        if progress is not None:
            progress.update(len(batch))
            if b == 0 and len(batches) > 1:
                from verl_ext.core.progress import eta_line

                progress.write(f"[sampling] {eta_line(len(batch), len(jobs), time.monotonic() - started)}")
    if progress is not None:
        progress.close()
    return [results[key] for key in sorted(results)]


def load_vllm(
    path: str | os.PathLike, seed: int = 0, dtype: str | None = None, logprobs_mode: str = "raw_logprobs", **engine_args
):
    """A `vllm.LLM` for sampling: float32 on vLLM's CPU build (the model's dtype on GPU), with the CPU
    build's fixed-size KV cache (`verl_ext.vllm_cpu.cpu_engine_kwargs`). `logprobs_mode`: vLLM's
    "raw_logprobs" (the model's own distribution, the default here) or "processed_logprobs" (after
    temperature / top-k / top-p, what verl's rollout asks for). `engine_args`: more `vllm.LLM` arguments."""
    from verl_ext.vllm_cpu import cpu_engine_kwargs, is_cpu_build, require_vllm

    require_vllm("backend=vllm")
    from vllm import LLM

    dtype = dtype or ("float32" if is_cpu_build() else "auto")
    return LLM(model=str(path), seed=seed, dtype=dtype, logprobs_mode=logprobs_mode, **{**cpu_engine_kwargs(), **engine_args})


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The vLLM request seed of prompt `prompt_index`: distinct per prompt (a shared seed would give every
    prompt the same random draws), the same for a prompt in any batch."""
    return (seed * 1_000_003 + prompt_index) % (2**63)


def _sample_vllm(model, tokenizer, prompts, n, *, temperature, top_p, top_k, max_new_tokens, seed, show_progress):
    from vllm import SamplingParams

    llm = load_vllm(model, seed=seed) if isinstance(model, (str, os.PathLike)) else model
    params = [
        SamplingParams(
            n=n,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            max_tokens=max_new_tokens,
            seed=prompt_seed(seed, p),
            logprobs=0,  # the sampled token's log-prob
            skip_special_tokens=True,
        )
        for p in range(len(prompts))
    ]
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling_params=params, use_tqdm=show_progress)
    generations = []
    for p, request in enumerate(outputs):
        for s, completion in enumerate(request.outputs):
            ids = list(completion.token_ids)
            generations.append(
                Generation(
                    prompt_index=p,
                    sample_index=s,
                    prompt_ids=list(prompts[p]),
                    response_ids=ids,
                    response_text=completion.text
                    if completion.text is not None
                    else tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="stop" if completion.finish_reason == "stop" else "length",
                    response_log_probs=[step[token].logprob for step, token in zip(completion.logprobs, ids, strict=True)]
                    if completion.logprobs is not None
                    else None,
                )
            )
    return generations
