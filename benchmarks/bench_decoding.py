"""Throughput of two-model decoding, relative to single-model generation measured in the same run.

    python benchmarks/bench_decoding.py                       # small random Qwen2s on CPU
    python benchmarks/bench_decoding.py --hidden 512 --layers 8 --vocab 32000 --batch 32 --device cuda
    python benchmarks/bench_decoding.py --coupling independent   # Alg. 1's fresh resample: same law, more cuts
    python benchmarks/bench_decoding.py --preset 1.5b --batch 32 --device cuda --no-spec   # GPU: roofline fractions

The spec / rl-draft rows measure the EXPERIMENTAL speculative rounds (`verl_ext/decoding/experimental.py`):
exact, but slower than the step loop on an H200 (DESIGN.md §6); `--no-spec` skips them.

Same models, batch, prompts and lengths for every row (EOS is an id the models cannot emit, so
every sequence runs the full length). Two criteria, each with τ calibrated on pilot runs to about
`--ratio` replace ratio:

  Δlog p < τ       reads both models: the gate is known only after the RL model has scored the draft
  H(π_B) > τ       reads the base model alone: decided before the RL model runs (see `engine.py`)

Rows, tokens/s (best of `--repeats` interleaved repeats: other load only ever adds time):

  single           one model, batched, KV cache (TwoModelDecoder with rl=None)       -> the baseline
  single static    one model on static KV caches, one fixed-shape step (StaticTwoModelDecoder, rl=None;
                   a CUDA graph per attention-width bucket on a GPU, eager on a CPU)
  <crit> static    two models step by step on static KV caches (same tokens as <crit> step)
  hf_generate      one model, transformers `generate` (for reference)
  <crit> step      two models, step by step (TwoModelDecoder), both KV caches
  <crit> spec(k)   experimental: exact speculative rounds of k drafts (SpeculativeTwoModelDecoder);
                   spec(auto) picks k every round
  dlogp rl-draft(k) experimental: π_RL drafts k tokens, π_B verifies them against the step's output law
                   (`draft_model="scorer"`: same law as the step loop, not the same tokens); k or auto
  official         the official approach's cost model: every token runs one full forward of each
                   model over the whole sequence (no KV-cache reuse), same sampler; timed over its
                   first `--official-tokens` tokens (its cheapest), so the speed-up is underestimated
  official(vllm)   the official approach for real (`official_vllm_decoding.py`): two `vllm.LLM`
                   engines on the same weights, one `generate(max_tokens=1, logprobs=50)` call of
                   each per token, prefix caching on, enforce_eager; same Δlog p τ and top-p, over
                   `--official-tokens` tokens; wherever vLLM is installed (its CPU build included)

Per row: replace ratio, stop rate r (cuts by a resample that differs from the draft, per drafted
position), share of sequences identical to the step loop's (float32: a k-token forward rounds
differently, so near-ties may flip), and the ratio to `single` (of the best times).

Cost-model bounds for the Δlog p rows (the gate reads π_RL at every position): a round of k costs
at least k draft steps plus one k-token scoring pass of c_k draft steps, and yields E[min(G,k)] =
(1−(1−r)^k)/r tokens per row, so spec/single ≤ max_k E[min(G,k)]/(k + c_k). c_1 = single/step − 1
measured here (the step row pays one draft step and one 1-token scoring pass per token). Printed
twice, per draft model (its stop rate r): with c_k = c_1 (a k-token pass costing as much as a
1-token one, roughly a GPU's case while memory-bound) and with c_k = c_1·t(k)/t(1), t the time of a
k-token forward measured in this run (a CPU computes every token). An estimate, not a hard limit:
c_1 also carries the step row's gate, resampling and bookkeeping of a round, which scale with k
more slowly than t(k) (a round pays its bookkeeping once; π_RL-drafted rounds build the step law on
a few tokens), so the best rows may pass it by a few percent.

Memory roofline (`--device cuda`, or `--roofline on`): a decode step of B rows must read every
parameter of each model it runs once and each row's cached keys and values, so a row cannot beat
B·bw / Σ_models (P + B·ℓ̄·kv) tokens/s, P the parameter bytes read per step (all but the embedding
table, of which B rows are gathered), kv the key+value bytes per cached token, ℓ̄ = prompt + new/2
the mean cached length, bw the device-to-device copy bandwidth measured in this run (2·bytes/s: a
copy reads and writes). One model for the single rows and hf_generate, two for the others; every
row is printed as its fraction of its roofline.

Presets (`--preset`, explicit flags win): 1.5b = Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12/2
heads, MLP 8960, vocab 151,936), 7b = Qwen2.5-7B's (3584, 28, 28/4, 18,944, 152,064); bfloat16.

Targets: step/single ≥ 0.45; on a GPU (1.5b, batch 32) static two-model ≥ 40% and static single ≥ 50%
of their rooflines. A speculative mode earns its way back into the main path only by beating the
static step on a GPU (its "vs static step" line).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
from official_vllm_decoding import TOP_LOGPROBS, official_decode  # benchmarks/, beside this script
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.core import rng
from verl_ext.core.distributions import log_softmax
from verl_ext.core.sampling import left_pad
from verl_ext.decoding.engine import Request, TwoModelDecoder, replace_ratio
from verl_ext.decoding.experimental import SpeculativeTwoModelDecoder, speculative_speed_bound
from verl_ext.decoding.sampler import DecodingRule, two_stage_step
from verl_ext.decoding.static import StaticTwoModelDecoder

PRESETS = {  # real models' shapes (random weights): Qwen2.5-1.5B and Qwen2.5-7B
    "1.5b": {"hidden": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "intermediate": 8960, "vocab": 151_936,
             "dtype": "bfloat16"},
    "7b": {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "intermediate": 18_944, "vocab": 152_064,
           "dtype": "bfloat16"},
}


def make_models(a):
    """(π_B, π_RL): a random Qwen2 with a peaked head and a copy perturbed by noise·std·ε. On a GPU
    the models are built there (a CPU would take minutes to initialise 7B parameters)."""
    torch.manual_seed(a.seed)
    cfg = Qwen2Config(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or a.hidden * 2,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    build_on = a.device if a.device.startswith("cuda") else "cpu"
    with torch.device(build_on):
        base = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(a.logit_scale)  # peakier than a fresh init (see the printed entropy)
    base = base.to(a.device, getattr(torch, a.dtype))
    rl = copy.deepcopy(base)
    g = torch.Generator(device=build_on).manual_seed(a.seed + 1)
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(a.noise * p.std() * torch.randn(p.shape, generator=g, device=build_on, dtype=p.dtype))
    return base, rl


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (it reads and writes `nbytes`: 2·nbytes/t), best of
    `repeats`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    return 2 * nbytes / min(wall_time(lambda: dst.copy_(src)) for _ in range(repeats))


def bytes_per_step(model, batch: int, mean_cached: float) -> float:
    """P + B·ℓ̄·kv: the parameter bytes one decode step reads (all but the embedding table, of which B
    rows are gathered) and the B rows' cached keys and values (ℓ̄ tokens each)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * embed.element_size()
    return params - embed.numel() * embed.element_size() + batch * mean_cached * kv_per_token


def official_cost_model(base, rl, rule, prompts, new_tokens, seed):
    """One full forward of each model per generated token (no cache reuse); same sampler and streams."""
    dev = next(base.parameters()).device
    seqs, mask = (t.to(dev) for t in left_pad(prompts, pad_token_id=0))
    keys = rng.sequence_keys(seed, torch.arange(len(prompts), device=dev))
    for t in range(new_tokens):
        lb = log_softmax(base(input_ids=seqs, attention_mask=mask).logits[:, -1])
        lr = log_softmax(rl(input_ids=seqs, attention_mask=mask).logits[:, -1])
        pos = torch.full_like(keys, t)
        u = [rng.uniforms(keys, pos, s) for s in (rng.STREAM_PROPOSAL, rng.STREAM_GATE, rng.STREAM_RESAMPLE)]
        y = two_stage_step(lb, lr, *u, rule).token
        seqs, mask = torch.cat([seqs, y[:, None]], dim=1), torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return len(prompts) * new_tokens


def official_vllm_engines(a, base, rl):
    """(π_B, π_RL) as two `vllm.LLM` engines with the official code's settings, or None (--official-vllm)."""
    from verl_ext.vllm_cpu import require_vllm, vllm_importable

    if a.official_vllm == "off" or (a.official_vllm == "auto" and not vllm_importable()):
        return None
    require_vllm("--official-vllm on")
    from verl_ext.generation import load_vllm

    max_len = a.prompt_len + a.prompt_len_spread + max(a.new_tokens, a.official_tokens) + 1
    engines = []
    for name, model in (("base", base), ("rl", rl)):
        with tempfile.TemporaryDirectory(prefix=f"bench_decoding_{name}_") as path:  # read once, at engine start
            model.save_pretrained(path)
            engines.append(load_vllm(path, seed=a.seed, dtype=a.dtype, skip_tokenizer_init=True, max_model_len=max_len,
                                     max_logprobs=TOP_LOGPROBS, enable_prefix_caching=True, enforce_eager=True))
    return tuple(engines)


def wall_time(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def scoring_pass_seconds(model, batch: int, ctx_len: int, ks, repeats: int, vocab: int) -> dict[int, float]:
    """Best seconds of a k-token forward (logits at all k positions, as the Δlog p verification
    runs) on a cache of ctx_len tokens, for each k; the cache is cropped back after every pass."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    cache = model(input_ids=torch.randint(0, vocab, (batch, ctx_len), generator=g).to(dev), use_cache=True).past_key_values
    out = {}
    for k in ks:
        ids = torch.randint(0, vocab, (batch, k), generator=g).to(dev)
        pos = torch.arange(ctx_len, ctx_len + k, device=dev).expand(batch, k)
        kwargs = {"input_ids": ids, "position_ids": pos, "past_key_values": cache, "use_cache": True, "logits_to_keep": k}
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            times.append(wall_time(lambda kw=kwargs: model(**kw)))
            cache.crop(ctx_len)
        out[k] = min(times[1:])
    return out


def calibrated_rule(criterion, ratio, base, rl, reqs, common, top_p, coupling):
    """A rule of `criterion` firing at about `ratio` of the positions, and the pilot's scores. Pilots
    decode on static caches (the step loop's tokens; fast on a GPU).

    τ is first the ratio-quantile of the score along base-sampled sequences (gate never fires:
    Δlog p fires below τ, H(π_B) above); replacing tokens changes the sequences and so the scores,
    so one more pilot with that τ measures the ratio m and the quantile is rescaled by ratio/m.
    """
    below = criterion == "delta_logp"
    never = -float("inf") if below else float("inf")
    pilot = StaticTwoModelDecoder(base, rl, DecodingRule(criterion, never, top_p=top_p, coupling=coupling), **common)
    scores = torch.tensor([s for r in pilot.generate(reqs) for s in r.scores])

    def rule_at(fraction):
        q = min(max(fraction, 0.0), 1.0)
        tau = float(torch.quantile(scores, q if below else 1 - q))
        return DecodingRule(criterion, tau, top_p=top_p, coupling=coupling)

    measured = replace_ratio(StaticTwoModelDecoder(base, rl, rule_at(ratio), **common).generate(reqs))
    return rule_at(ratio * ratio / max(measured, 1e-6)), scores


def stop_rate(d) -> float:
    """Cuts by a resample that differs from the draft, per position that could cut (E[min(G,k)]'s r)."""
    checked = getattr(d.stats, "checked", 0)
    return d.stats.mismatches / checked if checked else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a real model's shape (see above)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2·hidden)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="sequences to generate (default: --batch); more "
                   "than --batch exercises continuous batching")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prompt-len-spread", type=int, default=0, help="prompt lengths uniform in prompt-len ± this "
                   "(real prompts differ in length, and every row then attends through a padding mask)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-lens", type=int, nargs="+", default=[2, 4])
    p.add_argument("--no-auto", action="store_true", help="skip the spec(auto) rows")
    p.add_argument("--no-spec", action="store_true", help="skip every (experimental) speculative row (spec, "
                   "rl-draft) and the cost-model bounds")
    p.add_argument("--no-official", action="store_true", help="skip the official cost-model row")
    p.add_argument("--sync-every", type=int, default=8, help="static rows: steps between host checks")
    p.add_argument("--compile-layers", action="store_true", help="static rows: torch.compile each layer's pure "
                   "parts (norms, projections, rotary, MLP) inside the captured step")
    p.add_argument("--cuda-graph", default="auto", choices=["auto", "off"],
                   help="static rows: replay the step as CUDA graphs on a GPU (auto) or run it eagerly (off)")
    p.add_argument("--roofline", default="auto", choices=["auto", "on", "off"],
                   help="print the memory roofline and every row's fraction of it (auto: on a GPU)")
    p.add_argument("--no-rl-draft", action="store_true", help="skip the Δlog p rows drafted by π_RL")
    p.add_argument("--ratio", type=float, default=0.10, help="target replace ratio of both criteria")
    p.add_argument("--noise", type=float, default=0.1, help="RL = base + noise·std·ε")
    p.add_argument("--logit-scale", type=float, default=4.0)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--coupling", default="maximal", choices=["maximal", "independent"],
                   help="how the resample is drawn (sampler.resample): same law, different stop rates")
    p.add_argument("--official-tokens", type=int, default=16,
                   help="tokens timed for the official cost model (its first tokens are its cheapest: "
                        "fewer than --new-tokens underestimates our speed-up)")
    p.add_argument("--official-vllm", default="auto", choices=["auto", "on", "off"],
                   help="the official(vllm) row: auto = wherever vLLM is installed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    pre, _ = p.parse_known_args()
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    a = p.parse_args()
    if a.no_spec:
        a.draft_lens, a.no_auto, a.no_rl_draft = [], True, True
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    base, rl = make_models(a)
    eos = [a.vocab]  # an id no model can emit: every sequence runs the full length
    g = torch.Generator().manual_seed(a.seed)
    n_req = a.requests or a.batch
    if not 0 <= a.prompt_len_spread < a.prompt_len:
        p.error(f"--prompt-len-spread must be in [0, --prompt-len), got {a.prompt_len_spread}")
    tokens = torch.randint(0, a.vocab, (n_req, a.prompt_len + a.prompt_len_spread), generator=g).tolist()
    spread = torch.randint(-a.prompt_len_spread, a.prompt_len_spread + 1, (n_req,), generator=g).tolist()
    prompts = [row[: a.prompt_len + d] for row, d in zip(tokens, spread)]
    reqs = [Request(pr, stream_id=i) for i, pr in enumerate(prompts)]
    common = {"eos_token_ids": eos, "pad_token_id": 0, "max_new_tokens": a.new_tokens, "max_batch_size": a.batch,
              "seed": a.seed}

    rules = {"dlogp": calibrated_rule("delta_logp", a.ratio, base, rl, reqs, common, a.top_p, a.coupling)[0]}
    rules["H_base"], entropies = calibrated_rule("entropy_base", a.ratio, base, rl, reqs, common, a.top_p, a.coupling)
    single_rule = DecodingRule("none", 0.0, top_p=a.top_p)
    static_kw = {"sync_every": a.sync_every, "cuda_graph": "auto" if a.cuda_graph == "auto" else False,
                 "compile_layers": a.compile_layers}
    decoders = {"single": TwoModelDecoder(base, None, single_rule, **common),
                "single static": StaticTwoModelDecoder(base, None, single_rule, **static_kw, **common)}
    for crit, rule in rules.items():
        decoders[f"{crit} step"] = TwoModelDecoder(base, rl, rule, **common)
        decoders[f"{crit} static"] = StaticTwoModelDecoder(base, rl, rule, **static_kw, **common)
        for k in a.draft_lens + ([] if a.no_auto else ["auto"]):  # experimental
            decoders[f"{crit} spec({k})"] = SpeculativeTwoModelDecoder(base, rl, rule, draft_len=k, **common)
    rl_draft_lens = [] if a.no_rl_draft else a.draft_lens + ([] if a.no_auto else ["auto"])
    for k in rl_draft_lens:  # experimental: π_RL drafts, π_B verifies against the step's law
        decoders[f"dlogp rl-draft({k})"] = SpeculativeTwoModelDecoder(base, rl, rules["dlogp"], draft_len=k,
                                                                      draft_model="scorer", **common)
    ids, mask = (t.to(a.device) for t in left_pad(prompts[: a.batch], pad_token_id=0))
    n_off = a.official_tokens or a.new_tokens
    fns = {name: (lambda d=d: d.generate(reqs)) for name, d in decoders.items()}
    fns["hf_generate"] = lambda: base.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, top_p=a.top_p, top_k=0,
        max_new_tokens=a.new_tokens, pad_token_id=0, eos_token_id=None,
    )
    if not a.no_official:
        fns["official"] = lambda: official_cost_model(base, rl, rules["dlogp"], prompts[: a.batch], n_off, a.seed)
    tokens = {name: n_req * a.new_tokens for name in fns}
    tokens["hf_generate"] = a.batch * a.new_tokens
    tokens["official"] = a.batch * n_off
    engines = official_vllm_engines(a, base, rl)
    if engines:
        fns["official(vllm)"] = lambda: official_decode(*engines, prompts[: a.batch], n_off, rules["dlogp"].threshold,
                                                        set(eos), top_p=a.top_p, seed=a.seed)
        tokens["official(vllm)"] = a.batch * n_off

    results = {name: d.generate(reqs) for name, d in decoders.items()}  # warm-up, and the outputs to compare
    official_vllm = fns["official(vllm)"]() if engines else None  # warm-up (engine's first calls) + replace ratio
    for d in decoders.values():
        d.stats = type(d.stats)()  # count the timed repeats only
    times = {name: [] for name in fns}
    for _ in range(a.repeats):  # interleaved: load from other jobs hits every row alike
        for name, fn in fns.items():
            times[name].append(wall_time(fn))
    tps = {name: tokens[name] / min(ts) for name, ts in times.items()}
    vs_single = {name: tps[name] / tps["single"] for name in fns}
    vs_official = {name: tps[name] / tps["official"] if "official" in tps else float("nan") for name in fns}
    roofline = a.roofline == "on" or (a.roofline == "auto" and a.device.startswith("cuda"))
    if roofline:  # tokens/s bound of one model's rows and of two models' rows (see the module docstring)
        bw = copy_bandwidth(a.device)
        mean_cached = a.prompt_len + a.new_tokens / 2
        one = bytes_per_step(base, a.batch, mean_cached)
        bound = {"single": a.batch * bw / one, "pair": a.batch * bw / (one + bytes_per_step(rl, a.batch, mean_cached))}
        kind = lambda name: "single" if name.startswith(("single", "hf_generate")) else "pair"
        of_roof = {name: tps[name] / bound[kind(name)] for name in fns}

    print(f"models: hidden={a.hidden} layers={a.layers} vocab={a.vocab} dtype={a.dtype} device={a.device} "
          f"threads={a.threads}; coupling={a.coupling}; batch={a.batch} requests={n_req} prompt={a.prompt_len}±{a.prompt_len_spread} new={a.new_tokens}; "
          f"mean H(π_B) = {entropies.mean():.2f} nats (ln V = {torch.log(torch.tensor(float(a.vocab))):.2f}); "
          f"τ: Δlog p {rules['dlogp'].threshold:.3f}, H(π_B) {rules['H_base'].threshold:.3f}; "
          f"best of {a.repeats} repeats")
    print(f"{'mode':<16} {'tokens/s':>9} {'replace':>8} {'stop r':>7} {'mean k':>7} {'=step':>6} {'vs single':>10} "
          f"{'vs official':>12}" + (f" {'of roofline':>12}" if roofline else ""))
    for name in fns:
        d = decoders.get(name)
        crit = name.split()[0]
        step = results.get(f"{crit} step") or (results["single"] if name == "single static" else None)
        exact_tokens = d is not None and step is not None and not getattr(d, "scorer_drafts", False)  # rl-draft: law
        same = sum(x.tokens == y.tokens for x, y in zip(results[name], step)) / n_req if exact_tokens else float("nan")
        rounds = (getattr(d.stats, "rounds", 0) or getattr(d.stats, "steps", 1)) if d else 1  # static: 1-token rounds
        extra = (replace_ratio(results[name]), stop_rate(d), getattr(d.stats, "draft_forwards", rounds) / max(rounds, 1)) \
            if d else (float("nan"),) * 3
        if name == "official(vllm)":
            extra = (official_vllm.replaced / official_vllm.tokens, float("nan"), 1.0)
        print(f"{name:<16} {tps[name]:>9.1f} {extra[0]:>8.3f} {extra[1]:>7.3f} {extra[2]:>7.2f} {same:>6.0%} "
              f"{vs_single[name]:>10.3f} {vs_official[name]:>12.2f}" + (f" {of_roof[name]:>12.1%}" if roofline else ""))

    print(f"\nstep / single (target >= 0.45): Δlog p {vs_single['dlogp step']:.3f}, H(π_B) {vs_single['H_base step']:.3f}")
    print(f"static / step (same tokens): single {tps['single static'] / tps['single']:.2f}x, Δlog p "
          f"{tps['dlogp static'] / tps['dlogp step']:.2f}x, H(π_B) {tps['H_base static'] / tps['H_base step']:.2f}x; "
          f"static / single (two models vs one): Δlog p {vs_single['dlogp static']:.3f}")
    if roofline:
        print(f"memory roofline: copy bandwidth {bw / 1e12:.2f} TB/s; bytes per step {one / 1e9:.2f} GB per model "
              f"(batch {a.batch}, mean cached length {mean_cached:.0f}); one model {bound['single']:,.0f} tok/s, two "
              f"models {bound['pair']:,.0f} tok/s. Of roofline (targets: two-model static >= 40%, single static >= 50%): "
              f"single static {of_roof['single static']:.1%}, Δlog p static {of_roof['dlogp static']:.1%}, "
              f"H(π_B) static {of_roof['H_base static']:.1%}, Δlog p step {of_roof['dlogp step']:.1%}")
    for crit, label in (("dlogp", "Δlog p (reads both models)"), ("H_base", "H(π_B) (reads the base only)")):
        specs = [n for n in decoders if n.startswith((f"{crit} spec", f"{crit} rl-draft"))]
        if specs:
            best = max(specs, key=lambda n: vs_single[n])
            print(f"best spec / single (experimental; at ~{a.ratio:.0%} replace ratio), {label}: {best} "
                  f"{vs_single[best]:.3f}; vs static step {tps[best] / tps[f'{crit} static']:.3f} (> 1 earns a place "
                  f"in the main path)")
    if "official" in tps:
        print(f"step / official = {tps['dlogp step'] / tps['official']:.2f}x")
    if engines:
        print(f"step / official(vllm) = {tps['dlogp step'] / tps['official(vllm)']:.2f}x "
              f"(the official code's two vLLM engines, one call each per token)")

    result = {"ratio": round(vs_single["dlogp step"], 4), "ratio_of": "Δlog p step / single-model KV-cache generation",
              "target": ">= 0.45", "H_base_step_vs_single": round(vs_single["H_base step"], 4),
              "static_vs_step": {k: round(tps[f"{k} static"] / tps[f"{k} step"], 4) for k in ("dlogp", "H_base")},
              "single_static_vs_single": round(tps["single static"] / tps["single"], 4),
              "tokens_per_s": {name: round(tps[name], 1) for name in fns}}
    if "official" in tps:
        result["step_vs_official_cost_model"] = round(tps["dlogp step"] / tps["official"], 4)
    if engines:
        result["step_vs_official_vllm"] = round(tps["dlogp step"] / tps["official(vllm)"], 4)
    if roofline:
        result["of_roofline"] = {name: round(of_roof[name], 4) for name in fns}
    if not a.no_spec:
        # Δlog p reads π_RL at every position, so every round pays a k-token scoring pass. c_1 (its cost for
        # one token, with the gate, in draft steps) = single/step − 1; a k-token pass costs c_1·t(k)/t(1),
        # t measured here (on a GPU t(k) ≈ t(1) while the pass is memory-bound; a CPU computes every token).
        c1 = 1 / vs_single["dlogp step"] - 1
        ks = range(1, max([16, *a.draft_lens]) + 1)
        t_pass = scoring_pass_seconds(rl, a.batch, a.prompt_len + a.new_tokens // 2, ks, a.repeats * 4, a.vocab)
        measured = {k: c1 * t_pass[k] / t_pass[1] for k in ks}
        print("\nΔlog p cost-model bounds, spec/single <~ max_k E[min(G,k)]/(k + c_k) (stop rate r per checked "
              f"position); "
              f"c_1 = {c1:.2f} draft steps, k-token pass / 1-token pass: "
              + ", ".join(f"k={k} {t_pass[k] / t_pass[1]:.2f}" for k in (2, 4, 8, 16) if k in t_pass))
        for drafts, prefix in (("π_B", "dlogp spec("), ("π_RL", "dlogp rl-draft(")):
            rows = [n for n in decoders if n.startswith(prefix) and "auto" not in n]
            if not rows:
                continue
            r = statistics.median(stop_rate(decoders[n]) for n in rows)
            (b_flat, k_flat), (b_meas, k_meas) = (
                speculative_speed_bound(r, c) for c in (dict.fromkeys(ks, c1), measured))
            best = max((n for n in decoders if n.startswith(prefix)), key=lambda n: vs_single[n])
            print(f"  {drafts} drafts, r = {r:.3f}: c_k = c_1 (GPU-like) {b_flat:.3f} at k={k_flat}; measured c_k "
                  f"{b_meas:.3f} at k={k_meas}; best measured row {best} {vs_single[best]:.3f}")

    print("RESULT " + json.dumps(result, ensure_ascii=False))  # for benchmarks/record.py


if __name__ == "__main__":
    main()
