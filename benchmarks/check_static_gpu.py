"""On a GPU: does the captured static step give the tokens of the step loop? (A check, not a benchmark.)

    python benchmarks/check_static_gpu.py                 # cuda: TwoModelDecoder vs static (graph) vs static (eager)
    python benchmarks/check_static_gpu.py --device cpu    # the same comparisons without graphs (a dry run)

Small random Qwen2s in float32. For each rule, over the same requests and seed: the share of
sequences whose tokens and flags are identical between (a) `TwoModelDecoder` (the step loop),
(b) `StaticTwoModelDecoder` replaying CUDA graphs and (c) the static step run eagerly. (b) and (c)
run the same kernels, so anything below 100% there is a capture bug; (a) vs (b) may differ only
where float32 rounding of different attention kernels flips a near-tie. With two GPUs, (d) the
scorer on the second device, replayed as per-device graphs, against (b). Exits non-zero when
(b) and (c) differ or (a) vs (b) agrees on fewer than `--min-agreement` of the sequences.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.decoding.engine import Request, TwoModelDecoder
from verl_ext.decoding.sampler import DecodingRule
from verl_ext.decoding.static import StaticTwoModelDecoder

RULES = {
    "delta_logp": DecodingRule("delta_logp", -0.4, top_p=0.8),
    "entropy_base": DecodingRule("entropy_base", 2.0, top_p=0.9),
    "avg_kl-extrapolate": DecodingRule("avg_kl", 0.3, "extrapolate", gamma=0.3, temperature=0.9, top_p=0.9),
    "random-extrapolate": DecodingRule("random", 0.3, "extrapolate", gamma=0.5, top_p=0.95),
    "table1-rl-proposal": DecodingRule("delta_logp", 0.5, "extrapolate", gamma=0.4, propose_from="rl", top_p=0.9),
    "official-top5": DecodingRule("delta_logp", -0.3, "extrapolate", gamma=0.2, base_top_k_approximation=5),
    "none": DecodingRule("none", 0.0, top_p=0.8),
}


def models(device: str, vocab: int):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    base = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(6.0)
    rl = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    return base.to(device), rl.to(device)


def same(a, b) -> float:
    return sum((x.tokens, x.replaced) == (y.tokens, y.replaced) for x, y in zip(a, b)) / len(a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--min-agreement", type=float, default=0.9)
    a = ap.parse_args()
    base, rl = models(a.device, a.vocab)
    g = torch.Generator().manual_seed(2)
    reqs = [Request(torch.randint(3, a.vocab, (int(n),), generator=g).tolist(), stream_id=i)
            for i, n in enumerate(torch.randint(1, 40, (a.requests,), generator=g))]
    common = {"eos_token_ids": [1, 2], "pad_token_id": 0, "max_new_tokens": a.new_tokens, "seed": 3,
              "max_batch_size": 16}
    graph = a.device.startswith("cuda")
    two_gpus = graph and torch.cuda.device_count() >= 2
    ok = True
    print(f"device={a.device} graphs={graph} two_gpus={two_gpus} requests={a.requests} new={a.new_tokens}")
    for name, rule in RULES.items():
        t0 = time.perf_counter()
        loop = TwoModelDecoder(base, rl, rule, **common).generate(reqs)
        static_graph = StaticTwoModelDecoder(base, rl, rule, cuda_graph=graph, **common)
        replayed = static_graph.generate(reqs)
        eager = StaticTwoModelDecoder(base, rl, rule, cuda_graph=False, **common)
        eager.sync_free = True  # the graph's fixed-shape sampler, eagerly
        eagerly = eager.generate(reqs)
        line = (f"{name:<20} step loop = static(graph) {same(loop, replayed):6.1%}   static(graph) = static(eager) "
                f"{same(replayed, eagerly):6.1%}   graphs {static_graph.stats.graphs}  syncs/steps "
                f"{static_graph.stats.syncs}/{static_graph.stats.steps}")
        ok &= same(replayed, eagerly) == 1.0 and same(loop, replayed) >= a.min_agreement
        if two_gpus and rule.criterion != "none":
            split = StaticTwoModelDecoder(base, copy.deepcopy(rl).to("cuda:1"), rule, **common).generate(reqs)
            line += f"   two GPUs = one GPU {same(split, replayed):6.1%}"
            ok &= same(split, replayed) >= a.min_agreement
        print(line + f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
