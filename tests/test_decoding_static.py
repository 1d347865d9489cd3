"""Static-cache decoding (`verl_ext/decoding/static.py`) against independent computations.

- `decode_forward` / `prefill` against transformers' own cache-free forward of each sequence.
- `StaticTwoModelDecoder` against today's step loop (`TwoModelDecoder`) for every
  criterion of `decoding_reference.RULES`: the same tokens and flags for the same seeds, in
  float64 (scores to 1e-9) and in float32 (the CPU benchmark's dtype), whatever the slot count,
  sync period, request order, and for the fixed-shape sampler a CUDA graph runs.
- The law over whole sequences (chi-square, different seeds), with a power check.
"""

import copy
import random

import numpy as np
import pytest
import torch
from decoding_reference import (
    EOS,
    PAD,
    PROMPTS,
    PROPOSER_ONLY,
    RULES,
    _sequence_histograms,
    decoder,
    make_models,
)
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from verl_ext.core import distributions, rng
from verl_ext.decoding import static as static_module
from verl_ext.decoding.engine import Request, replace_ratio
from verl_ext.decoding.sampler import DecodingRule, two_stage_step, two_stage_step_all_rows
from verl_ext.decoding.static import (
    StaticTwoModelDecoder,
    allocate_kv,
    bucket_for,
    decode_forward,
    prefill,
    width_buckets,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return make_models()


@pytest.fixture(scope="module")
def models32(models):
    return tuple(copy.deepcopy(m).float() for m in models)


def static(base, rl, rule, **kw):
    kw.setdefault("max_new_tokens", 10)
    return StaticTwoModelDecoder(base, rl, rule, eos_token_ids=[EOS], pad_token_id=PAD, **kw)


REQS = [Request(PROMPTS[i % 6], stream_id=100 + i) for i in range(14)]


# ----------------------------------------------------------------------------- the forward


def _tiny(kind):
    torch.manual_seed(0)
    common = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if kind == "qwen2":
        return make_models(vocab=50)[0]
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common)).double().eval()
    return LlamaForCausalLM(LlamaConfig(**common)).double().eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_decode_forward_matches_transformers_on_each_whole_sequence(kind):
    """Slots of different lengths, prefilled together (right padding) and stepped together: each
    step's logits equal transformers' forward of that slot's whole sequence at its last position."""
    model = _tiny(kind)
    seqs = [[3, 4, 5, 6, 7], [9], [11, 12], [20, 21, 22, 23, 24, 25, 26]]
    kv = allocate_kv(model, slots=6, max_len=16)
    slots = torch.tensor([4, 0, 2, 5])  # any slots, in any order
    ctx = [s[:-1] for s in seqs]
    ids = torch.zeros(4, max(map(len, ctx)), dtype=torch.long)
    for i, c in enumerate(ctx):
        ids[i, : len(c)] = torch.tensor(c)
    prefill(model, kv, slots, ids)
    tokens = torch.zeros(6, dtype=torch.long)
    lengths = torch.zeros(6, dtype=torch.long)
    tokens[slots] = torch.tensor([s[-1] for s in seqs])
    lengths[slots] = torch.tensor([len(c) for c in ctx])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            width = int(lengths.max()) + 1
            logits = decode_forward(model, kv, tokens, lengths, width)
            for i, s in enumerate(slots.tolist()):
                full = model(torch.tensor([seqs[i]])).logits[0, -1]
                torch.testing.assert_close(logits[s], full, rtol=1e-10, atol=1e-10)
            nxt = torch.randint(0, 50, (6,), generator=g)
            for i, s in enumerate(slots.tolist()):
                seqs[i].append(int(nxt[s]))
            tokens, lengths = nxt, lengths + 1


def test_width_buckets_cover_every_length():
    assert width_buckets(1000, 128) == [128, 256, 512, 1000]
    assert width_buckets(128, 128) == [128]
    assert bucket_for(129, [128, 256, 1000]) == 256 and bucket_for(1000, [128, 256, 1000]) == 1000
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(1001, [128, 1000])


# ----------------------------------------------------------------------------- same tokens as the step loop


@pytest.mark.parametrize("name", list(RULES))
def test_same_tokens_as_the_step_loop_for_every_criterion(models, models32, name):
    """float64: tokens, flags, finish reasons equal, scores to 1e-9; float32: tokens and flags equal.
    Fewer slots than requests (refills), EOS between host checks (sync_every=3)."""
    rule = RULES[name]
    for (base, rl), exact in ((models, True), (models32, False)):
        ref = decoder(base, rl, rule, seed=11, max_batch_size=4).generate(REQS)
        dec = static(base, rl, rule, seed=11, max_batch_size=3, sync_every=3)
        got = dec.generate(REQS)
        for x, y in zip(ref, got):
            assert (x.tokens, x.replaced, x.finish_reason) == (y.tokens, y.replaced, y.finish_reason), (name, exact)
            if exact:
                np.testing.assert_allclose(y.scores, x.scores, rtol=1e-9, atol=1e-12)
        assert dec.stats.tokens == sum(len(r.tokens) for r in ref)
        assert dec.projects_fired_rows_only == (name in PROPOSER_ONLY)  # as the step loop
    assert any(r.finish_reason == "eos" for r in ref)
    if name not in ("none", "all-gamma0"):
        assert 0 < replace_ratio(ref) < 1


def test_results_do_not_depend_on_slots_sync_period_or_order(models):
    base, rl = models
    rule = RULES["delta_logp"]
    alone = [static(base, rl, rule, seed=3, max_batch_size=1, sync_every=1).generate([r])[0] for r in REQS]
    shuffled = REQS[:]
    random.Random(0).shuffle(shuffled)
    for slots, sync_every in ((2, 1), (5, 7), (16, 4)):
        dec = static(base, rl, rule, seed=3, max_batch_size=slots, sync_every=sync_every)
        by_stream = {r.stream_id: x for r, x in zip(shuffled, dec.generate(shuffled))}
        for req, ref in zip(REQS, alone):
            assert (by_stream[req.stream_id].tokens, by_stream[req.stream_id].replaced) == (ref.tokens, ref.replaced)
        # host checks only every sync_every steps, or when a row reaches its length budget
        assert dec.stats.syncs < dec.stats.steps or sync_every == 1
    assert any(any(r.replaced) for r in alone)


def test_a_second_generate_reuses_or_grows_the_caches(models):
    base, rl = models
    rule = RULES["avg_kl-extrapolate"]
    dec = static(base, rl, rule, seed=5, max_batch_size=4)
    first = dec.generate(REQS[:4])
    longer = [Request(list(range(2, 30)), stream_id=7)]  # a longer prompt than any before: caches grow
    grown = dec.generate(longer)
    again = dec.generate(REQS[:4])
    assert [r.tokens for r in first] == [r.tokens for r in again]
    assert grown[0].tokens == decoder(base, rl, rule, seed=5).generate(longer)[0].tokens
    assert dec.max_len >= 28 + 10


def test_fixed_shape_sampler_equals_the_fired_rows_sampler(monkeypatch):
    """`two_stage_step_all_rows` (what a CUDA graph runs: resample everywhere, nucleus by a full sort)
    gives `two_stage_step`'s tokens, flags and scores, for every rule, also where the nucleus is
    wider than the candidate path's 64 tokens."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 64, 300
    logits_b = torch.randn(n, vocab, generator=g, dtype=torch.float64) * torch.linspace(0.1, 6, n, dtype=torch.float64)[:, None]
    logits_r = logits_b + 0.7 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    lb, lr = torch.log_softmax(logits_b, -1), torch.log_softmax(logits_r, -1)
    keys = rng.sequence_keys(0, torch.arange(n))
    u = [rng.uniforms(keys, torch.zeros(n, dtype=torch.long), s) for s in range(3)]
    wide = distributions.top_p_mask(lb, 0.9).sum(-1)
    assert (wide > distributions._NUCLEUS_CANDIDATES).any() and (wide < 10).any()
    for name, rule in RULES.items():
        ref = two_stage_step(lb, lr, *u, rule)
        monkeypatch.setattr(distributions, "must_not_sync", lambda t: True)  # as under graph capture
        got = two_stage_step_all_rows(lb, lr, *u, rule)
        monkeypatch.undo()
        assert torch.equal(got.token, ref.token) and torch.equal(got.fired, ref.fired), name
        torch.testing.assert_close(got.score, ref.score, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("split_devices", [False, True], ids=["one device", "two-device pieces"])
def test_the_graph_step_gives_the_same_tokens_run_eagerly(models32, monkeypatch, split_devices):
    """The step a GPU captures (fixed-shape sampler, full-sort nucleus; on two devices one piece per
    device and the scorer's log-probs copied across), run eagerly on the CPU: the step loop's tokens."""
    base, rl = models32
    monkeypatch.setattr(distributions, "must_not_sync", lambda t: True)
    for name in ("delta_logp", "table1-rl-proposal", "official-top5", "none"):
        ref = decoder(base, rl, RULES[name], seed=2).generate(REQS)
        dec = static(base, rl, RULES[name], seed=2, max_batch_size=4)
        dec.sync_free, dec.split_devices = True, split_devices
        got = dec.generate(REQS)
        assert [(r.tokens, r.replaced) for r in got] == [(r.tokens, r.replaced) for r in ref], name
        assert dec.two_devices == (split_devices and name != "none")


@pytest.mark.parametrize("split_devices", [False, True], ids=["one device", "two-device pieces"])
def test_captured_steps_replayed_per_width_bucket_give_the_step_loops_tokens(models32, monkeypatch, split_devices):
    """The GPU's control flow on a CPU: `capture_graph` replaced by a stand-in that runs the body
    where the warm-ups and the capture would run (at allocation, every slot empty) and again at each
    replay; widths bucketed from 4 up, so steps attend over stale, masked columns of refilled slots.
    The step loop's tokens, and one graph per bucket (per device piece on two devices)."""
    base, rl = models32
    monkeypatch.setattr(distributions, "must_not_sync", lambda t: True)
    monkeypatch.setattr(static_module, "WIDTH_QUANTUM", 4)

    def capture_stand_in(device, body, pool=None):
        for _ in range(3):
            body()
        return body, pool

    monkeypatch.setattr(static_module, "capture_graph", capture_stand_in)
    for name in ("delta_logp", "entropy_base", "table1-rl-proposal", "none"):
        ref = decoder(base, rl, RULES[name], seed=2).generate(REQS)
        dec = static(base, rl, RULES[name], seed=2, max_batch_size=4, sync_every=3)
        dec.use_graph = dec.sync_free = True
        dec.split_devices = split_devices
        got = dec.generate(REQS)
        assert [(r.tokens, r.replaced) for r in got] == [(r.tokens, r.replaced) for r in ref], name
        assert dec.buckets == [4, 8, 16] and dec.stats.graphs == 3 * (3 if dec.two_devices else 1)


def test_compiled_layers_give_the_same_tokens(models):
    """`compile_layers=True` (torch.compile of each layer's pure parts): float64, the step loop's tokens."""
    base, rl = models
    for name in ("delta_logp", "entropy_base"):
        ref = decoder(base, rl, RULES[name], seed=11).generate(REQS)
        dec = static(base, rl, RULES[name], seed=11, max_batch_size=4, compile_layers=True)
        assert [(r.tokens, r.replaced) for r in dec.generate(REQS)] == [(r.tokens, r.replaced) for r in ref], name


def test_single_model_decoding_is_the_proposer_alone(models):
    base, rl = models
    plain = static(base, None, DecodingRule("none", 0.0, top_p=0.8), seed=2).generate(REQS)
    ref = decoder(base, None, DecodingRule("none", 0.0, top_p=0.8), seed=2).generate(REQS)
    assert [r.tokens for r in plain] == [r.tokens for r in ref]
    none = static(base, rl, DecodingRule("none", 0.0, top_p=0.8), seed=2)
    assert none.models == [base] and [r.tokens for r in none.generate(REQS)] == [r.tokens for r in plain]


# ----------------------------------------------------------------------------- the law


def test_static_decoding_follows_the_step_loops_law_over_whole_sequences():
    """Different seeds: sequences with their flags from the static decoder and from the step loop
    have the same law (chi-square over whole sequences); base vs RL sampling is told apart (power)."""
    base, rl = make_models(vocab=6, seed=7, eos_boost=1.0, perturb=0.8)
    base, rl = base.float(), rl.float()
    n = 3000
    reqs = [Request([2, 3], stream_id=i) for i in range(n)]
    for rule in (DecodingRule("delta_logp", -0.3, top_p=0.95), DecodingRule("random", 0.3, "extrapolate", gamma=0.5,
                                                                              top_p=0.9)):
        step = decoder(base, rl, rule, seed=1, max_batch_size=256, max_new_tokens=3).generate(reqs)
        got = static(base, rl, rule, seed=2, max_batch_size=256, max_new_tokens=3).generate(reqs)
        table = _sequence_histograms(step, got, key=lambda r: (tuple(r.tokens), tuple(r.replaced)))
        assert table.shape[1] > 10
        assert stats.chi2_contingency(table).pvalue > 1e-3
        assert abs(replace_ratio(step) - replace_ratio(got)) < 0.04
    base_only = static(base, None, DecodingRule("none", 0.0, top_p=0.95), seed=4, max_batch_size=256,
                       max_new_tokens=3).generate(reqs)
    rl_only = static(rl, None, DecodingRule("none", 0.0, top_p=0.95), seed=4, max_batch_size=256,
                     max_new_tokens=3).generate(reqs)
    assert stats.chi2_contingency(_sequence_histograms(base_only, rl_only)).pvalue < 1e-6


def test_clear_errors(models):
    base, rl = models
    with pytest.raises(ValueError, match="needs criterion 'none'"):
        static(base, None, RULES["delta_logp"])
    with pytest.raises(ValueError, match="must be >= 1"):
        static(base, rl, RULES["delta_logp"], sync_every=0)
    with pytest.raises(ValueError, match="cuda_graph needs every model on a CUDA device"):
        static(base, rl, RULES["delta_logp"], cuda_graph=True)
    gpt = copy.deepcopy(base)
    gpt.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="static decoding supports model types"):
        static(gpt, rl, RULES["delta_logp"])
    with pytest.raises(ValueError, match="empty prompt"):
        static(base, rl, RULES["delta_logp"]).generate([Request([], stream_id=0)])
