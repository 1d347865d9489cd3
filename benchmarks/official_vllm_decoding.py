"""The paper's official decoding approach, for real: two `vllm.LLM` engines, one engine call per token.

What the official code (github Hesse73/RLVR-Directions) does for selective token replacement, and
what it costs: for every generated token, each engine runs `generate(max_tokens=1, logprobs=50)`
on the whole prefix (prefix caching on, `enforce_eager=True`); Python then samples ŷ from π_B's
top-50 (renormalised, nucleus top-p 0.7), computes Δlog p(ŷ) = log π_RL(ŷ) − log π_B(ŷ) (a token
missing from π_RL's top-50 gets π_RL's smallest returned log-prob) and, where Δlog p(ŷ) < τ,
resamples from π_RL's top-50 nucleus. `official_decode` reproduces that loop over a batch of
sequences (every call carries all unfinished ones), so its tokens/s are what that design pays
per token on this machine: vLLM's per-call overhead and a prefix recomputed up to the cache's
block granularity.

    python benchmarks/official_vllm_decoding.py --model <dir> [--rl-model <dir>]   # default: tiny assets

Prints tokens/s of the official loop and of one engine's own batched `generate` of the same
lengths in the same run (vLLM's best case for one model), and their ratio. `bench_decoding.py`
imports `official_decode` for its `official(vllm)` row.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass

TOP_LOGPROBS = 50  # the official code's logprobs=50


@dataclass
class OfficialResult:
    responses: list[list[int]]
    replaced: int  # fired positions
    tokens: int
    seconds: float


def nucleus_sample(log_probs: dict[int, float], top_p: float, u: float) -> int:
    """Draw from the top-k log-probs renormalised, keeping the smallest most-probable set reaching top_p."""
    items = sorted(log_probs.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(math.exp(lp) for _, lp in items)
    kept, mass = [], 0.0
    for token, lp in items:
        kept.append((token, math.exp(lp) / total))
        mass += kept[-1][1]
        if mass >= top_p:
            break
    target, acc = u * mass, 0.0
    for token, p in kept:
        acc += p
        if acc >= target:
            return token
    return kept[-1][0]


def official_decode(base_llm, rl_llm, prompts: list[list[int]], max_new_tokens: int, tau: float,
                    eos_ids: set[int], top_p: float = 0.7, seed: int = 0) -> OfficialResult:
    """Selective replacement at the Δlog p < τ gate, the official way: two engine calls per token."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=TOP_LOGPROBS, seed=seed)
    rand = random.Random(seed)
    responses: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    replaced = 0
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        if not active:
            break
        requests = [{"prompt_token_ids": prompts[i] + responses[i]} for i in active]
        base_out = base_llm.generate(requests, params, use_tqdm=False)
        rl_out = rl_llm.generate(requests, params, use_tqdm=False)
        still = []
        for i, b, r in zip(active, base_out, rl_out, strict=True):
            base_top = {t: lp.logprob for t, lp in b.outputs[0].logprobs[0].items()}
            rl_top = {t: lp.logprob for t, lp in r.outputs[0].logprobs[0].items()}
            token = nucleus_sample(base_top, top_p, rand.random())
            if rl_top.get(token, min(rl_top.values())) - base_top[token] < tau:
                token = nucleus_sample(rl_top, top_p, rand.random())
                replaced += 1
            responses[i].append(token)
            if token not in eos_ids:
                still.append(i)
        active = still
    seconds = time.perf_counter() - start
    return OfficialResult(responses, replaced, sum(map(len, responses)), seconds)


def batched_generate_seconds(llm, prompts: list[list[int]], lengths: list[int]) -> float:
    """One engine's own batched generation of exactly `lengths` new tokens per prompt (ignore_eos)."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True, seed=i) for i, n in enumerate(lengths)]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    from transformers import AutoTokenizer

    from verl_ext.core.prompts import encode_messages
    from verl_ext.generation import load_vllm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="π_B directory (default: the tiny assets' model)")
    parser.add_argument("--rl-model", help="π_RL directory (default: the same model)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tau", type=float, default=-0.3, help="Δlog p gate (the paper's DAPO-32B pair)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.model is None:
        from verl_ext.tiny_assets import ensure_tiny_assets, prompt_text

        args.model = str(ensure_tiny_assets().model_dir)
        questions = [prompt_text(f"{a}+{b}") for a in range(9) for b in range(3)][: args.prompts]
    else:
        questions = [f"What is {a} times {a + 3}?" for a in range(args.prompts)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [encode_messages(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    official = {"max_logprobs": TOP_LOGPROBS, "enable_prefix_caching": True, "enforce_eager": True}
    base = load_vllm(args.model, seed=0, **official)
    rl = load_vllm(args.rl_model or args.model, seed=0, **official)
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    best_official, best_batched, result = math.inf, math.inf, None
    for rep in range(args.repeats):
        result = official_decode(base, rl, prompts, args.new_tokens, args.tau, eos, seed=rep)
        best_official = min(best_official, result.seconds)
        best_batched = min(best_batched, batched_generate_seconds(base, prompts, [len(r) for r in result.responses]))
    print(f"official loop (2 engines, 1 token/call): {result.tokens / best_official:9.1f} tokens/s "
          f"({result.tokens} tokens, replace ratio {result.replaced / result.tokens:.3f})")
    print(f"one engine, batched generate           : {result.tokens / best_batched:9.1f} tokens/s")
    print(f"ratio official / batched = {best_batched / best_official:.3f}")


if __name__ == "__main__":
    main()
