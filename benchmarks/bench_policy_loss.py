"""Cost of the weighting hook: our `dapo_reweight` loss vs verl's `vanilla` loss, same tensors.

    python benchmarks/bench_policy_loss.py [--batch 64 --length 8192 --repeats 20 --device cpu]

Times forward + backward of the policy loss alone (the model forward dominates a real step, so
this is the worst case for the hook's relative overhead) and prints the ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig, PolicyLossConfig

from verl_ext.policy_loss import ReweightPolicyLossConfig


def make_config(policy_loss) -> ActorConfig:
    return ActorConfig(
        strategy="fsdp2",
        rollout_n=16,
        ppo_mini_batch_size=32,
        ppo_micro_batch_size_per_gpu=4,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
        policy_loss=policy_loss,
    )


def time_loss(loss_mode, config, tensors, repeats, device) -> list[float]:
    fn = get_policy_loss_fn(loss_mode)
    old, new_base, adv, mask = tensors
    times = []
    for _ in range(repeats + 2):
        new = new_base.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = fn(old, new, adv, mask, "token-mean", config)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[2:]  # drop warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    old = torch.log(torch.rand(args.batch, args.length, generator=g).clamp(1e-4, 1.0)).to(device)
    new = (old + 0.05 * torch.randn(old.shape, generator=g).to(device)).detach()
    adv = torch.randn(args.batch, 1, generator=g).expand(-1, args.length).contiguous().to(device)
    lengths = torch.randint(args.length // 4, args.length + 1, (args.batch,), generator=g).to(device)
    mask = torch.arange(args.length, device=device)[None] < lengths[:, None]
    tensors = (old, new, adv, mask)

    vanilla_cfg = make_config(PolicyLossConfig(loss_mode="vanilla"))
    ours_cfg = make_config(ReweightPolicyLossConfig(weighting="lowprob", alpha=0.2))
    # Interleave the two so machine noise hits both alike.
    t_vanilla, t_ours = [], []
    for _ in range(3):
        t_vanilla += time_loss("vanilla", vanilla_cfg, tensors, args.repeats, device)
        t_ours += time_loss("dapo_reweight", ours_cfg, tensors, args.repeats, device)
    med_v, med_o = statistics.median(t_vanilla), statistics.median(t_ours)
    tokens = int(mask.sum())
    print(f"device={device} batch={args.batch} length={args.length} valid tokens={tokens}")
    print(f"verl vanilla loss fwd+bwd: {med_v * 1e3:8.2f} ms (median of {len(t_vanilla)})")
    print(f"dapo_reweight (lowprob):   {med_o * 1e3:8.2f} ms (median of {len(t_ours)})")
    print(f"ratio ours/vanilla = {med_o / med_v:.3f}   (target <= 1.10)")
    print("RESULT " + json.dumps({  # for benchmarks/record.py
        "ratio": round(med_o / med_v, 4), "ratio_of": "dapo_reweight (lowprob) / vanilla, loss fwd+bwd",
        "target": "<= 1.10", "vanilla_ms": round(med_v * 1e3, 3), "dapo_reweight_ms": round(med_o * 1e3, 3),
        "device": str(device), "batch": args.batch, "length": args.length, "valid_tokens": tokens}))


if __name__ == "__main__":
    main()
