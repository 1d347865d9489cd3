"""Verifying π_RL's drafts: the step law over the vocabulary vs on the draft support, same run.

    python benchmarks/bench_step_law.py                          # N = 16 positions, V = 8192 (CPU bench shapes)
    python benchmarks/bench_step_law.py --rows 256 --vocab 151936  # a Qwen2.5 vocabulary, 32 rows × 8 drafts

An (experimental) π_RL-drafted round (`experimental.SpeculativeTwoModelDecoder(draft_model="scorer")`) builds the step's output law
m at every drafted position, accepts the draft against it and draws the gate's flag given the
emitted token. Over the vocabulary that is a dozen float64 passes of [N, V]; `step_law(...,
draft_log_law)` builds it on the tokens p_prop, q or the draft law give mass to (a handful at
top-p 0.7). The random log-probs have the entropy of `--logit-scale`; π_RL = π_B + noise. Prints
the best of `--repeats` times of both and their ratio, and checks they pick the same tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from verl_ext.core.distributions import entropy
from verl_ext.core.sampling import sample_from_log_probs
from verl_ext.decoding.experimental import latent_gate, step_law, verify_drafts
from verl_ext.decoding.sampler import DecodingRule, sampling_log_probs, speculative_accept


def verify(lb, lr, draft_log_law, drafted, u, rule, on_support: bool):
    """Acceptance and latent gate: as the rounds run them (`experimental.verify_drafts`, the law on the
    draft support), or with the law over the vocabulary."""
    if on_support:
        out = verify_drafts(lb, lr, rule, draft_log_law, drafted, *u, draft_is_resampling=True)
        return out.token, out.fired
    law = step_law(lb, lr, rule)
    y = speculative_accept(law.emitted, draft_log_law.double().exp(), drafted, u[0])
    fired, _, _ = latent_gate(law, y, u[1], u[2], lb, lr, rule)
    return y, fired


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16, help="drafted positions verified at once (rows × draft length)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--logit-scale", type=float, default=6.0)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--threshold", type=float, default=-0.3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    lb = torch.log_softmax(a.logit_scale * torch.randn(a.rows, a.vocab, generator=g), -1)
    lr = torch.log_softmax(lb + a.noise * torch.randn(a.rows, a.vocab, generator=g), -1)
    rule = DecodingRule("delta_logp", a.threshold, top_p=a.top_p)
    draft_log_law = sampling_log_probs(lr, rule.temperature, rule.top_p)
    drafted = sample_from_log_probs(draft_log_law, torch.rand(a.rows, generator=g, dtype=torch.float64))
    u = [torch.rand(a.rows, generator=g, dtype=torch.float64) for _ in range(3)]
    args = (lb, lr, draft_log_law, drafted, u, rule)
    y_vocab, fired_vocab = verify(*args, on_support=False)
    y_support, fired_support = verify(*args, on_support=True)
    same = float(((y_vocab == y_support) & (fired_vocab == fired_support)).double().mean())
    t_vocab = best_seconds(lambda: verify(*args, on_support=False), a.repeats)
    t_support = best_seconds(lambda: verify(*args, on_support=True), a.repeats)
    width = step_law(lb, lr, rule, draft_log_law, True).columns.shape[1]
    print(f"N={a.rows} V={a.vocab} top_p={a.top_p} threads={a.threads}: mean H(π_B) = {entropy(lb).mean():.2f} nats, "
          f"support width {width} (max over rows), same tokens and flags at {same:.0%} of positions")
    print(f"vocabulary {t_vocab * 1e3:.2f} ms, support {t_support * 1e3:.2f} ms (best of {a.repeats}): "
          f"support / vocabulary = {t_support / t_vocab:.3f}")
    print("RESULT " + json.dumps({  # for benchmarks/record.py
        "ratio": round(t_support / t_vocab, 4),
        "ratio_of": "step law on the draft support / over the vocabulary, time",
        "vocabulary_ms": round(t_vocab * 1e3, 3), "support_ms": round(t_support * 1e3, 3),
        "same_tokens": round(same, 4),
        "rows": a.rows, "vocab": a.vocab}))


if __name__ == "__main__":
    main()
