"""Where the time of one static two-model step goes: kernel time by kind, and the replayed graph's
step time against the sum of its kernels (the rest is gaps between kernels).

    python benchmarks/profile_static_step.py --preset 1.5b --batch 32            # on a GPU
    python benchmarks/profile_static_step.py --hidden 64 --layers 2 --device cpu  # dry run

Builds the bench's model pair (`bench_decoding.make_models`), decodes one batch with
`StaticTwoModelDecoder` (Δlog p gate at a fixed τ), then (1) times `--steps` replays of the step
(CUDA graphs on a GPU) with the host synchronised once, and (2) runs the same step eagerly
(the fixed-shape sampler, as captured) under `torch.profiler` and sums the device time of its
kernels by kind: matrix products, attention, sorting (the nucleus), the rest. Prints the top
kernels and the memory roofline of the step (parameter + KV bytes over a measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from bench_decoding import PRESETS, bytes_per_step, copy_bandwidth, make_models  # benchmarks/, beside this script
from torch.profiler import ProfilerActivity, profile

from verl_ext.decoding.engine import Request
from verl_ext.decoding.sampler import DecodingRule
from verl_ext.decoding.static import StaticTwoModelDecoder

KINDS = (("attention", ("attention", "fmha", "flash", "sdpa", "efficient")),  # before matmul: cutlass fmha
         ("matmul", ("gemm", "gemv", "cublas", "cutlass", "sm90_", "nvjet", "aten::mm", "aten::addmm", "aten::bmm",
                     "aten::linear", "aten::matmul")),
         ("sort/topk", ("sort", "radix", "topk", "scan", "cumsum")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--logit-scale", type=float, default=4.0)
    pre, _ = p.parse_known_args()
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    a = p.parse_args()
    torch.set_grad_enabled(False)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base, rl = make_models(a)
    g = torch.Generator().manual_seed(a.seed)
    reqs = [Request(torch.randint(0, a.vocab, (a.prompt_len,), generator=g).tolist(), stream_id=i) for i in range(a.batch)]
    rule = DecodingRule("delta_logp", -0.5, top_p=0.7)
    common = {"eos_token_ids": [a.vocab], "pad_token_id": 0, "max_new_tokens": a.new_tokens + a.steps + 8,
              "max_batch_size": a.batch, "seed": a.seed}
    dec = StaticTwoModelDecoder(base, rl, rule, **common)
    width = a.prompt_len + a.new_tokens
    with torch.inference_mode():
        dec._ensure_state(a.prompt_len + common["max_new_tokens"])  # caches (and graphs)
        dec._admit(list(range(a.batch)), reqs)
        for _ in range(a.new_tokens):  # a context of prompt + new tokens, as mid-way through a run
            dec._run_step(width)
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            dec._run_step(width)
        sync()
        step_s = (time.perf_counter() - t0) / a.steps
        eager = StaticTwoModelDecoder(base, rl, rule, cuda_graph=False, **common)
        eager.sync_free = True  # the captured step's sampler
        eager._ensure_state(a.prompt_len + common["max_new_tokens"])
        eager._admit(list(range(a.batch)), reqs)
        for _ in range(3):
            eager._run_step(width)
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                eager._run_step(width)
            sync()
    by_kind, kernels = defaultdict(float), defaultdict(float)
    for evt in prof.key_averages():
        t = (evt.self_device_time_total if cuda else evt.self_cpu_time_total) / 5  # µs per step
        if t <= 0 or (cuda and evt.device_type != torch.autograd.DeviceType.CUDA):
            continue
        if not cuda and not evt.key.startswith("aten::"):
            continue
        by_kind[kind_of(evt.key)] += t
        kernels[evt.key] += t
    total = sum(by_kind.values())
    mean_cached = a.prompt_len + a.new_tokens
    need = bytes_per_step(base, a.batch, mean_cached) + bytes_per_step(rl, a.batch, mean_cached)
    bw = copy_bandwidth(a.device) if cuda else float("nan")
    print(f"device={a.device} dtype={a.dtype} hidden={a.hidden} layers={a.layers} vocab={a.vocab} batch={a.batch} "
          f"cached={mean_cached} graphs={dec.use_graph}")
    print(f"replayed step: {step_s * 1e3:.3f} ms ({a.batch / step_s:,.0f} tok/s); "
          f"{'device' if cuda else 'cpu'} time of its kernels run eagerly: {total / 1e3:.3f} ms per step")
    if cuda:
        print(f"memory roofline of the step: {need / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s = {need / bw * 1e3:.3f} ms "
              f"({a.batch * bw / need:,.0f} tok/s): replayed step at {need / bw / step_s:.1%} of it; kernels alone "
              f"{need / bw / (total / 1e6):.1%}")
    print("kernel time by kind (per step): " + ", ".join(f"{k} {v / 1e3:.3f} ms ({v / total:.0%})"
                                                         for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    print("top kernels (µs per step):")
    for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {t:9.1f}  {kind_of(name):<10} {name[:110]}")


if __name__ == "__main__":
    main()
