"""Throughput and peak memory of the full token-metric computation vs two bare forward passes.

Baseline (same run, same models, same sequence): `base(ids).logits` and `rl(ids).logits`, i.e. two
ordinary forward passes that only produce logits. Measured: `PairScorer.score`, which gives
log π_B(y), log π_RL(y), Δlog p, both entropies and the three KLs per token, exactly over the
full vocabulary in float32, with bounded memory. Prints tokens/s of both, their ratio (target
≥ 0.8), and the peak resident-memory growth of each (Linux VmHWM, reset before each phase).

    python benchmarks/bench_token_metrics.py                       # V=151,936, L=4096, hidden 64 (CPU)
    python benchmarks/bench_token_metrics.py --quick               # L=1024, one repetition
    python benchmarks/bench_token_metrics.py --hidden 896 --layers 4 --seq-len 1024   # a wider model
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.analysis.token_metrics import PairScorer, SequencePair


def random_model(vocab: int, hidden: int, layers: int, seed: int, max_len: int, dtype: torch.dtype) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    heads = max(1, hidden // 64) if hidden >= 64 else 4
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory_growth(fn) -> tuple[float, int | None]:
    """(seconds, bytes by which peak RSS grew) for one call of `fn`; bytes None where VmHWM cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS:")
    except OSError:
        before = None
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, (_status("VmHWM:") - before) if before is not None else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--block-rows", type=int, default=None, help="softmax rows per block (default: 2 on CPU)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions; the fastest is reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="--seq-len 1024 --reps 1")
    args = ap.parse_args()
    if args.quick:
        args.seq_len, args.reps = 1024, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = random_model(args.vocab, args.hidden, args.layers, 0, args.seq_len, dtype).to(args.device)
    rl = random_model(args.vocab, args.hidden, args.layers, 1, args.seq_len, dtype).to(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.seq_len,), generator=g).tolist()
    seq = [SequencePair(ids[: args.prompt_len], ids[args.prompt_len :])]
    n_tokens = len(seq[0].response_ids)
    scorer = PairScorer(
        base, rl, chunk_size=args.chunk_size, batch_size=1, max_batch_tokens=args.seq_len, block_rows=args.block_rows
    )
    input_ids = torch.tensor([ids], device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def bare():
        with torch.no_grad():
            zb = base(input_ids=input_ids, use_cache=False).logits
            zr = rl(input_ids=input_ids, use_cache=False).logits
            sync()
            del zb, zr

    def metrics():
        scorer.score(seq)
        sync()

    # Warm-up at a short length (thread pools, kernels), then alternate the two, best of --reps.
    short = [SequencePair(ids[:8], ids[8:64])]
    scorer.score(short)
    with torch.no_grad():
        base(input_ids=input_ids[:, :64]).logits, rl(input_ids=input_ids[:, :64]).logits
    times = {"bare": [], "metrics": []}
    mem = {"bare": [], "metrics": []}
    for _ in range(args.reps):
        for name, fn in (("bare", bare), ("metrics", metrics)):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            dt, grow = peak_memory_growth(fn)
            if args.device.startswith("cuda"):
                grow = torch.cuda.max_memory_allocated()
            times[name].append(dt)
            mem[name].append(grow)
    tb, tm = min(times["bare"]), min(times["metrics"])
    full_logits = args.seq_len * args.vocab * 4
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.0f} MiB"
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} vocab={args.vocab} hidden={args.hidden} "
        f"layers={args.layers} seq_len={args.seq_len} scored_tokens={n_tokens} chunk_size={args.chunk_size} "
        f"block_rows={args.block_rows or 'default'}"
    )
    print(
        f"two bare forward passes (logits only): {n_tokens / tb:10,.0f} tok/s  ({tb:.2f} s)  peak memory growth {mib(max(mem['bare'], key=lambda x: x or 0))}"
    )
    print(
        f"full metrics (8 per token, exact)    : {n_tokens / tm:10,.0f} tok/s  ({tm:.2f} s)  peak memory growth {mib(max(mem['metrics'], key=lambda x: x or 0))}"
    )
    print(f"ratio metrics/bare throughput: {tb / tm:.2f}  (target >= 0.8)")
    print(f"for scale: one float32 [1, {args.seq_len}, {args.vocab}] logits tensor is {mib(full_logits)}")
    peak = lambda name: max((x or 0 for x in mem[name]), default=0) / 2**20
    print("RESULT " + json.dumps({  # for benchmarks/record.py
        "ratio": round(tb / tm, 4), "ratio_of": "metrics / two bare forward passes, throughput", "target": ">= 0.8",
        "bare_tok_per_s": round(n_tokens / tb), "metrics_tok_per_s": round(n_tokens / tm),
        "peak_growth_bare_mib": round(peak("bare")), "peak_growth_metrics_mib": round(peak("metrics")),
        "device": args.device, "vocab": args.vocab, "seq_len": args.seq_len, "scored_tokens": n_tokens}))


if __name__ == "__main__":
    main()
