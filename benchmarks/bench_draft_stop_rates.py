"""Which model should draft the (experimental) speculative rounds? Per-position cut rates of both choices, exactly.

    python benchmarks/bench_draft_stop_rates.py                     # tiny CPU assets (base + perturbed RL)
    python benchmarks/bench_draft_stop_rates.py models.base=outputs/reproduce_mini/base/model \\
        models.rl=outputs/reproduce_mini/models/none data.files=[outputs/reproduce_mini/data/eval.parquet]

Arguments are Hydra overrides of `configs/token_replacement.yaml` (models, data, decoding.top_p,
decoding.temperature) plus `+fire_rates=[...]`, `+new_tokens=N`, `+problems=N`.

The rounds live in `verl_ext/decoding/experimental.py` (opt-in: slower than the step loop on a
measured GPU, DESIGN.md §6). A step emits y ~ m(y) = p(y)(1 − G(y)) + [Σ_v p(v) G(v)]·q(y)
(`experimental.step_law`). A round
drafted from a law d is cut at a position with probability at least TV(d, m) (speculative
sampling accepts at most 1 − TV), and the engine attains it: with π_B drafting
(`draft_model="proposer"`, maximal coupling) the cut rate is TV(p, m); with π_RL drafting
(`draft_model="scorer"`) it is TV(d_RL, m), d_RL = π_RL's sampling law. Both are computed here
from the two models' exact next-token distributions along responses sampled from π_B, with τ
set (bisection on Σ p G averaged over the positions) to each target fire rate. The last columns
are the cost-model bound max_k E[min(G,k)]/(k + 1) of each choice: a k-token scoring pass costing
one draft step, roughly a GPU's case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from verl_ext.core.distributions import entropy, log_softmax
from verl_ext.decoding.engine import Request, TwoModelDecoder
from verl_ext.decoding.experimental import speculative_speed_bound, step_law
from verl_ext.decoding.sampler import DecodingRule, sampling_log_probs
from verl_ext.decoding.sweep import load_models_and_problems

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def next_token_log_probs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log π(· | prompt, response_<t) at every response position t, `[T, V]`."""
    ids = torch.tensor([prompt + response[:-1]])
    return log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 :])


def tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a - b).abs().sum(-1)


def calibrated(criterion: str, fire_rate: float, lb, lr, top_p: float, temperature: float) -> DecodingRule:
    """τ whose mean fire probability Σ_v p(v)G(v) over the positions is `fire_rate`."""
    if criterion == "entropy_base":  # fires above τ: the (1 − rate)-quantile of H(π_B)
        return DecodingRule(criterion, float(torch.quantile(entropy(lb), 1 - fire_rate)), top_p=top_p,
                            temperature=temperature)
    lo, hi = -30.0, 0.0
    for _ in range(60):
        rule = DecodingRule(criterion, (lo + hi) / 2, top_p=top_p, temperature=temperature)
        law = step_law(lb, lr, rule)
        rate = float(law.fired.sum(-1).mean())
        lo, hi = (lo, rule.threshold) if rate > fire_rate else (rule.threshold, hi)
    return rule


def main(overrides: list[str]) -> None:
    torch.set_grad_enabled(False)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("token_replacement", overrides=["models.device=cpu", *overrides])
    fire_rates = list(cfg.get("fire_rates", [0.05, 0.1, 0.2]))
    new_tokens, n_problems = int(cfg.get("new_tokens", 16)), int(cfg.get("problems", 64))
    base, rl, tok, problems, eos = load_models_and_problems(cfg)
    d = cfg.decoding
    sampler = TwoModelDecoder(base, None, DecodingRule("none", 0.0, top_p=d.top_p, temperature=d.temperature),
                              eos_token_ids=eos, pad_token_id=tok.pad_token_id or 0, max_new_tokens=new_tokens)
    prompts = [p["prompt_ids"] for p in problems[:n_problems]]
    responses = sampler.generate([Request(p, stream_id=i) for i, p in enumerate(prompts)])
    lb = torch.cat([next_token_log_probs(base, p, r.tokens) for p, r in zip(prompts, responses)])
    lr = torch.cat([next_token_log_probs(rl, p, r.tokens) for p, r in zip(prompts, responses)])
    draft_rl = sampling_log_probs(lr, d.temperature, d.top_p).to(torch.float64).exp()
    print(f"{len(prompts)} prompts × ≤{new_tokens} tokens sampled from π_B: {lb.shape[0]} positions; "
          f"top_p={d.top_p}, T={d.temperature}")
    print(f"{'criterion':<13} {'fire':>5} {'τ':>8} {'cut π_B drafts':>15} {'cut π_RL drafts':>16} "
          f"{'bound π_B':>10} {'bound π_RL':>11}")
    for criterion in ("delta_logp", "entropy_base"):
        for rate in fire_rates:
            rule = calibrated(criterion, rate, lb, lr, d.top_p, d.temperature)
            law = step_law(lb, lr, rule)
            m = law.emitted
            cut_b, cut_r = float(tv(law.proposal, m).mean()), float(tv(draft_rl, m).mean())
            (bb, kb), (br, kr) = (speculative_speed_bound(cut, 1.0, max_len=32) for cut in (cut_b, cut_r))
            print(f"{criterion:<13} {float(law.fired.sum(-1).mean()):>5.3f} {rule.threshold:>8.3f} "
                  f"{cut_b:>15.4f} {cut_r:>16.4f} {bb:>6.3f} k={kb:<2} {br:>6.3f} k={kr:<2}")


if __name__ == "__main__":
    main(sys.argv[1:])
