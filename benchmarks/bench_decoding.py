"""Throughput of two-model decoding, relative to single-model generation measured in the same run.

    python benchmarks/bench_decoding.py                       # small random Qwen2s on CPU
    python benchmarks/bench_decoding.py --hidden 512 --layers 8 --vocab 32000 --batch 32 --device cuda

Same models, batch, prompts and lengths for every row (EOS is an id the models cannot emit, so
every sequence runs the full length). Criterion: Δlog p < τ with τ calibrated to about
`--ratio` replace ratio on a pilot run. Rows, tokens/s (best of `--repeats`):

  single       one model, batched, KV cache (TwoModelDecoder with rl=None)        -> the baseline
  hf_generate  one model, transformers `generate` (for reference)
  step         two models, step by step (draft_len=1), both KV caches
  spec(k)      two models, exact speculative rounds of k drafts
  official     the official approach's cost model: every token runs one full forward of each
               model over the whole sequence (no KV-cache reuse), same sampler; timed over its
               first `--official-tokens` tokens (its cheapest), so the speed-up is underestimated

Printed ratios: step/single (target ≥ 0.45), spec/single (target ≥ 0.8 at ~10% replace ratio),
and step/official, spec/official (speed-up over the official cost model).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.decoding import rng
from verl_ext.decoding.engine import Request, TwoModelDecoder, replace_ratio
from verl_ext.decoding.sampler import DecodingRule, two_stage_step
from verl_ext.distributions import log_softmax


def make_models(a):
    torch.manual_seed(a.seed)
    cfg = Qwen2Config(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 2, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    base = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(a.logit_scale)  # peakier than a fresh init, like a trained LM
    rl = copy.deepcopy(base)
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(a.noise * p.std() * torch.randn(p.shape, generator=g))
    dtype = getattr(torch, a.dtype)
    return base.to(a.device, dtype), rl.to(a.device, dtype)


def official_cost_model(base, rl, rule, prompts, new_tokens, seed):
    """One full forward of each model per generated token (no cache reuse); same sampler and streams."""
    dev = next(base.parameters()).device
    seqs = torch.tensor(prompts, device=dev)
    keys = rng.sequence_keys(seed, torch.arange(len(prompts), device=dev))
    for t in range(new_tokens):
        lb = log_softmax(base(input_ids=seqs).logits[:, -1])
        lr = log_softmax(rl(input_ids=seqs).logits[:, -1])
        pos = torch.full_like(keys, t)
        u = [rng.uniforms(keys, pos, s) for s in (rng.STREAM_PROPOSAL, rng.STREAM_GATE, rng.STREAM_RESAMPLE)]
        y = two_stage_step(lb, lr, *u, rule).token
        seqs = torch.cat([seqs, y[:, None]], dim=1)
    return len(prompts) * new_tokens


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="sequences to generate (default: --batch); more "
                   "than --batch exercises continuous batching")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-lens", type=int, nargs="+", default=[3, 4, 6])
    p.add_argument("--ratio", type=float, default=0.10, help="target replace ratio for the Δlog p threshold")
    p.add_argument("--noise", type=float, default=0.1, help="RL = base + noise·std·ε")
    p.add_argument("--logit-scale", type=float, default=4.0)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--official-tokens", type=int, default=16,
                   help="tokens timed for the official cost model (its first tokens are its cheapest: "
                        "fewer than --new-tokens underestimates our speed-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    base, rl = make_models(a)
    eos = [a.vocab]  # an id no model can emit: every sequence runs the full length
    g = torch.Generator().manual_seed(a.seed)
    n_req = a.requests or a.batch
    prompts = torch.randint(0, a.vocab, (n_req, a.prompt_len), generator=g).tolist()
    reqs = [Request(pr, stream_id=i) for i, pr in enumerate(prompts)]
    common = {"eos_token_ids": eos, "pad_token_id": 0, "max_new_tokens": a.new_tokens, "max_batch_size": a.batch, "seed": a.seed}

    # τ for about `--ratio` replace ratio: the ratio-quantile of Δlog p(ŷ) under base sampling
    pilot = TwoModelDecoder(base, rl, DecodingRule("delta_logp", -float("inf"), top_p=a.top_p), **common)
    scores = torch.tensor([s for r in pilot.generate(reqs) for s in r.scores])
    tau = float(torch.quantile(scores, a.ratio))
    rule = DecodingRule("delta_logp", tau, top_p=a.top_p)

    decoders = {"single": TwoModelDecoder(base, None, DecodingRule("none", 0.0, top_p=a.top_p), **common),
                "step": TwoModelDecoder(base, rl, rule, draft_len=1, **common)}
    for k in a.draft_lens:
        decoders[f"spec(k={k})"] = TwoModelDecoder(base, rl, rule, draft_len=k, **common)
    ids = torch.tensor(prompts[: a.batch], device=a.device)
    n_off = a.official_tokens or a.new_tokens
    fns = {name: (lambda d=d: d.generate(reqs)) for name, d in decoders.items()}
    fns["hf_generate"] = lambda: base.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=a.top_p, top_k=0,
        max_new_tokens=a.new_tokens, pad_token_id=0, eos_token_id=None,
    )
    fns["official"] = lambda: official_cost_model(base, rl, rule, prompts[: a.batch], n_off, a.seed)
    tokens = {name: n_req * a.new_tokens for name in fns}
    tokens["hf_generate"] = a.batch * a.new_tokens
    tokens["official"] = a.batch * n_off
    results = {name: fn() for name, fn in fns.items()}  # warm-up (and the outputs to compare)
    same = {}  # spec vs step: identical up to float ties (a k-token forward rounds differently in float32)
    for name in decoders:
        if name.startswith("spec"):
            same[name] = sum(x.tokens == y.tokens for x, y in zip(results[name], results["step"])) / n_req
    best = {name: float("inf") for name in fns}
    for _ in range(a.repeats):  # interleaved, best of `repeats`: robust to other load on the machine
        for name, fn in fns.items():
            t, _ = timed(fn, 1)
            best[name] = min(best[name], t)
    ratio = {name: replace_ratio(results[name]) if name in decoders else float("nan") for name in fns}
    rows = {name: (tokens[name] / best[name], ratio[name], None) for name in fns}

    print(f"models: hidden={a.hidden} layers={a.layers} vocab={a.vocab} dtype={a.dtype} device={a.device} "
          f"threads={a.threads}; batch={a.batch} requests={n_req} prompt={a.prompt_len} new={a.new_tokens}; τ(Δlog p)={tau:.3f}")
    print(f"{'mode':<12} {'tokens/s':>10} {'replace':>8} {'vs single':>10} {'vs official':>12}")
    single, official = rows["single"][0], rows["official"][0]
    for name, (tps, ratio, _) in rows.items():
        print(f"{name:<12} {tps:>10.1f} {ratio:>8.3f} {tps / single:>10.3f} {tps / official:>12.2f}")
    print("spec sequences identical to step: " + ", ".join(f"{n} {v:.0%}" for n, v in same.items()))
    best_k = max((n for n in rows if n.startswith("spec")), key=lambda n: rows[n][0])
    print(f"step / single     = {rows['step'][0] / single:.3f}   (target >= 0.45)")
    print(f"{best_k} / single = {rows[best_k][0] / single:.3f}   (target >= 0.8 at ~10% replace ratio)")
    print(f"step / official   = {rows['step'][0] / official:.2f}x;  {best_k} / official = {rows[best_k][0] / official:.2f}x")


if __name__ == "__main__":
    main()
