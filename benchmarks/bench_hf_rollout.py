"""Throughput of the `hf_reproducible` rollout's batched generation against plain `model.generate`.

Both generate the same number of new tokens for the same left-padded batch of prompts with the
same model, sampling at the same temperature/top-p/top-k; ours also returns every sampled
token's log-prob. Prints tokens/s of each and the ratio ours / generate (target >= 0.8).

    python benchmarks/bench_hf_rollout.py                      # random Qwen2, 256 hidden, 4 layers
    python benchmarks/bench_hf_rollout.py --top-p 0.9 --vocab 32000
    python benchmarks/bench_hf_rollout.py --server             # also through the Ray server actor

`--server` sends the batch as concurrent single-sequence requests to an `HFRolloutServer` Ray
actor (what verl's agent loop does) and reports its tokens/s including request batching.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from verl_ext.core import rng
from verl_ext.core.sampling import left_pad
from verl_ext.cpu.hf_generate import SamplingSpec, generate_batch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others are shorter (left padding)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported) after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--server", action="store_true", help="also measure through the Ray server actor")
    return parser.parse_args()


def build_model(args):
    """A random Qwen2 of the requested size (no eos, so every row generates exactly --new-tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.prompt_len + args.new_tokens + 8,
        tie_word_embeddings=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


def make_prompts(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=generator)
    return [torch.randint(1, args.vocab, (int(n),), generator=generator).tolist() for n in lengths]


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pair(fn_a, fn_b, reps: int) -> tuple[float, float]:
    """Median seconds of `fn_a` and `fn_b`, interleaved (a, b, a, b, ...) so that load from other
    processes on a shared machine hits both alike; one warm-up call each."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def run_ours(model, prompts, args):
    spec = SamplingSpec(max_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    outs = generate_batch(model, prompts, spec, 0, rng.sequence_keys(2, torch.arange(len(prompts))))
    assert all(len(o.token_ids) == args.new_tokens for o in outs)


def run_hf_generate(model, prompts, args):
    ids, mask = left_pad(prompts, 0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=max(0, args.top_k),
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        pad_token_id=0,
    )
    assert out.shape[1] == ids.shape[1] + args.new_tokens


def run_server(model, prompts, args) -> float:
    """Median seconds for the whole batch as concurrent requests to an HFRolloutServer actor."""
    import tempfile

    import ray
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl.workers.rollout.replica import RolloutMode

    from verl_ext.cpu.rollout import HFRolloutServer

    with tempfile.TemporaryDirectory() as model_dir:
        model.save_pretrained(model_dir)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            config = RolloutConfig(
                name="hf_reproducible",
                full_determinism=True,
                tensor_model_parallel_size=1,
                prompt_length=args.prompt_len,
                response_length=args.new_tokens,
                dtype="float32",
                load_format="auto",
                max_num_seqs=args.batch,
                ignore_eos=True,
            )
            server = (
                ray.remote(HFRolloutServer)
                .options(max_concurrency=1000)
                .remote(
                    config=config,
                    model_config=HFModelConfig(path=model_dir, load_tokenizer=False),
                    rollout_mode=RolloutMode.HYBRID,
                    workers=[],
                    replica_rank=0,
                )
            )
            params = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "logprobs": True}

            def once():
                refs = [
                    server.generate.remote(prompt_ids=p, sampling_params=params, request_id=str(i))
                    for i, p in enumerate(prompts)
                ]
                assert all(len(o.token_ids) == args.new_tokens for o in ray.get(refs))

            return timed(once, args.reps)
        finally:
            ray.shutdown()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    prompts = make_prompts(args)
    tokens = args.batch * args.new_tokens
    print(
        f"model: Qwen2 hidden={args.hidden} layers={args.layers} vocab={args.vocab}; batch={args.batch} "
        f"prompt<={args.prompt_len} new={args.new_tokens}; T={args.temperature} top_p={args.top_p} "
        f"top_k={args.top_k}; torch threads={torch.get_num_threads()}"
    )
    with torch.no_grad():
        t_hf, t_ours = timed_pair(
            lambda: run_hf_generate(model, prompts, args), lambda: run_ours(model, prompts, args), args.reps
        )
    print(f"model.generate       : {tokens / t_hf:9.1f} tokens/s ({t_hf:.3f} s)")
    print(f"hf rollout (batched) : {tokens / t_ours:9.1f} tokens/s ({t_ours:.3f} s, with log-probs)")
    print(f"ratio hf rollout / model.generate = {t_hf / t_ours:.2f}  (target >= 0.8)")
    result = {"ratio": round(t_hf / t_ours, 4), "ratio_of": "hf rollout / model.generate, tokens/s", "target": ">= 0.8",
              "generate_tok_per_s": round(tokens / t_hf, 1), "hf_rollout_tok_per_s": round(tokens / t_ours, 1),
              "batch": args.batch, "new_tokens": args.new_tokens}
    if args.server:
        t_server = run_server(model, prompts, args)
        print(
            f"hf rollout via Ray server ({args.batch} concurrent requests): {tokens / t_server:9.1f} tokens/s "
            f"({t_server:.3f} s); ratio to model.generate = {t_hf / t_server:.2f}"
        )
        result["ray_server_ratio"] = round(t_hf / t_server, 4)
    print("RESULT " + json.dumps(result))  # for benchmarks/record.py


if __name__ == "__main__":
    main()
