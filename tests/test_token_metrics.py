"""verl_ext.analysis.token_metrics against independent per-position computations (CPU, tiny models)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.analysis.token_metrics import (
    METRICS,
    PairScorer,
    SequencePair,
    check_head_reproduces_logits,
    check_same_output_vocab,
    check_same_tokenizer,
    cross_log_prob_sums,
    metrics_from_log_probs,
    metrics_from_logits,
)


def naive_position_metrics(z_base: torch.Tensor, z_rl: torch.Tensor, token: int) -> dict[str, float]:
    """One position, float64, written from the definitions (0·log 0 := 0)."""
    lb, lr = torch.log_softmax(z_base.double(), -1), torch.log_softmax(z_rl.double(), -1)
    pb, pr = lb.exp(), lr.exp()

    def plogq(p, logq):  # Σ_v p(v)·logq(v) over the support of p
        return float(torch.where(p > 0, p * logq, torch.zeros_like(p)).sum())

    def kl(p, logp, logq):
        return float(torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum())

    kl_rb, kl_br = kl(pr, lr, lb), kl(pb, lb, lr)
    return {
        "logp_base": float(lb[token]),
        "logp_rl": float(lr[token]),
        "delta_logp": float(lr[token] - lb[token]),
        "entropy_base": -plogq(pb, lb),
        "entropy_rl": -plogq(pr, lr),
        "kl_rl_base": kl_rb,
        "kl_base_rl": kl_br,
        "kl_avg": 0.5 * (kl_rb + kl_br),
    }


def assert_matches_naive(out: dict[str, torch.Tensor], z_base, z_rl, tokens, atol=2e-5):
    for t in range(len(tokens)):
        ref = naive_position_metrics(z_base[t], z_rl[t], int(tokens[t]))
        for k in METRICS:
            assert out[k][t].item() == pytest.approx(ref[k], abs=atol, rel=1e-5), (k, t)


def random_logits(n: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


# ----------------------------------------------------------------------------- pure math


@pytest.mark.parametrize("block_rows", [1, 2, 64])
def test_metrics_from_logits_match_naive(block_rows):
    zb, zr = random_logits(7, 50, 0), random_logits(7, 50, 1, scale=5.0)
    zb[3, 0] = 40.0  # a peaked distribution
    tokens = torch.tensor([0, 5, 49, 0, 7, 7, 3])
    out = metrics_from_logits(zb, zr, tokens, block_rows=block_rows)
    assert set(out) == set(METRICS) and all(out[k].dtype == torch.float32 for k in METRICS)
    assert_matches_naive(out, zb, zr, tokens)


def test_thread_split_equals_single_thread():
    zb, zr = random_logits(11, 70, 12), random_logits(11, 70, 13)
    tokens = torch.arange(11)
    threads_before = torch.get_num_threads()
    one = metrics_from_logits(zb, zr, tokens, block_rows=2, num_threads=1)
    three = metrics_from_logits(zb, zr, tokens, block_rows=2, num_threads=3)
    assert torch.get_num_threads() == threads_before  # restored
    for k in METRICS:
        assert torch.equal(one[k], three[k]), k


def test_bf16_logits_are_scored_in_float32():
    zb, zr = random_logits(4, 64, 2).bfloat16(), random_logits(4, 64, 3).bfloat16()
    tokens = torch.tensor([1, 2, 3, 4])
    out = metrics_from_logits(zb, zr, tokens)
    assert all(out[k].dtype == torch.float32 for k in METRICS)
    assert_matches_naive(out, zb.float(), zr.float(), tokens)


def test_masked_vocabulary_uses_exact_zero_handling():
    zb, zr = random_logits(3, 20, 4), random_logits(3, 20, 5)
    zb[0, 10:] = float("-inf")  # π_B gives zero mass to half the vocabulary at position 0
    zr[1, :5] = float("-inf")
    tokens = torch.tensor([2, 7, 9])
    out = metrics_from_logits(zb, zr, tokens, block_rows=1)
    assert out["kl_rl_base"][0].item() == math.inf  # π_RL > 0 = π_B somewhere
    assert math.isfinite(out["kl_base_rl"][0].item())
    assert math.isfinite(out["entropy_base"][0].item())
    ref = naive_position_metrics(zb[0], zr[0], 2)
    assert out["kl_base_rl"][0].item() == pytest.approx(ref["kl_base_rl"], abs=2e-5)
    assert out["entropy_base"][0].item() == pytest.approx(ref["entropy_base"], abs=2e-5)
    assert_matches_naive({k: v[2:] for k, v in out.items()}, zb[2:], zr[2:], tokens[2:])


def test_cross_sums_give_entropy_and_kl():
    logp = torch.log_softmax(random_logits(5, 30, 6).view(5, 1, 30).repeat(1, 2, 1) + torch.randn(5, 2, 30), -1)
    c = cross_log_prob_sums(logp)
    p = logp.exp()
    for a in range(2):
        for b in range(2):
            assert torch.allclose(c[:, a, b], (p[:, a] * logp[:, b]).sum(-1), atol=1e-5)


def test_identical_models_give_zero_kl_and_delta():
    z = random_logits(9, 40, 7)
    tokens = torch.arange(9)
    out = metrics_from_logits(z, z.clone(), tokens)
    assert torch.equal(out["delta_logp"], torch.zeros(9))
    for k in ("kl_rl_base", "kl_base_rl", "kl_avg"):
        assert out[k].abs().max().item() < 1e-5
    assert torch.equal(out["entropy_base"], out["entropy_rl"])


def test_kl_nonnegative_and_entropy_at_most_log_v():
    v = 257
    zb, zr = random_logits(64, v, 8, scale=0.01), random_logits(64, v, 9, scale=10.0)  # near-uniform vs peaked
    out = metrics_from_logits(zb, zr, torch.randint(0, v, (64,)))
    for k in ("kl_rl_base", "kl_base_rl", "kl_avg"):
        assert out[k].min().item() >= -1e-5
    assert out["entropy_base"].max().item() <= math.log(v) + 1e-5
    assert out["entropy_base"].max().item() > math.log(v) - 1e-2  # the near-uniform one is close to the bound
    assert out["entropy_rl"].min().item() >= -1e-5


def test_log_prob_path_equals_logit_path():
    zb, zr = random_logits(6, 33, 10), random_logits(6, 33, 11)
    tokens = torch.tensor([0, 1, 2, 30, 31, 32])
    a = metrics_from_logits(zb, zr, tokens)
    b = metrics_from_log_probs(torch.log_softmax(zb, -1), torch.log_softmax(zr, -1), tokens)
    for k in METRICS:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"logit shapes differ: base \(2, 5\) vs RL \(2, 6\)"):
        metrics_from_logits(torch.zeros(2, 5), torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- tiny models


def tiny_qwen(vocab: int = 97, seed: int = 0, hidden: int = 32, layers: int = 2, tie: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


def make_sequences(vocab: int, seed: int = 0) -> list[SequencePair]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, r in [(3, 5), (1, 1), (6, 9), (2, 4), (4, 0), (5, 7)]:
        ids = torch.randint(0, vocab, (p + r,), generator=g).tolist()
        out.append(SequencePair(prompt_ids=ids[:p], response_ids=ids[p:]))
    return out


def naive_sequence_metrics(base, rl, seq: SequencePair) -> dict[str, list[float]]:
    """Each sequence alone (no padding), full logits of each model, then one position at a time."""
    ids = torch.tensor([list(seq.prompt_ids) + list(seq.response_ids)])
    with torch.no_grad():
        zb, zr = base(ids).logits[0], rl(ids).logits[0]
    p = len(seq.prompt_ids)
    rows = [
        naive_position_metrics(zb[p - 1 + t], zr[p - 1 + t], seq.response_ids[t]) for t in range(len(seq.response_ids))
    ]
    return {k: [r[k] for r in rows] for k in METRICS}


def test_pair_scorer_matches_naive_full_forward():
    base, rl = tiny_qwen(seed=0), tiny_qwen(seed=1)
    seqs = make_sequences(97)
    got = PairScorer(base, rl, chunk_size=4, batch_size=3).score(seqs)
    for seq, m in zip(seqs, got, strict=True):
        ref = naive_sequence_metrics(base, rl, seq)
        assert all(len(m[k]) == len(seq.response_ids) for k in METRICS)
        for k in METRICS:
            assert m[k].tolist() == pytest.approx(ref[k], abs=5e-5, rel=1e-4), k


def test_chunked_equals_unchunked():
    base, rl = tiny_qwen(seed=2), tiny_qwen(seed=3, tie=True)
    seqs = make_sequences(97, seed=1)
    a = PairScorer(base, rl, chunk_size=1, batch_size=1, block_rows=1).score(seqs)
    b = PairScorer(base, rl, chunk_size=10_000, batch_size=64, block_rows=10_000).score(seqs)
    for ma, mb in zip(a, b, strict=True):
        for k in METRICS:
            assert torch.allclose(ma[k], mb[k], atol=1e-5, rtol=1e-5), k


def test_same_model_gives_zero_delta_and_kl():
    base = tiny_qwen(seed=4)
    for m in PairScorer(base, base, chunk_size=3).score(make_sequences(97, seed=2)):
        assert torch.equal(m["delta_logp"], torch.zeros_like(m["delta_logp"]))
        for k in ("kl_rl_base", "kl_base_rl", "kl_avg"):
            assert float(m[k].abs().max()) < 1e-5 if len(m[k]) else True
        assert bool((m["entropy_base"] <= math.log(97) + 1e-5).all())


def test_pair_scorer_rejects_bad_inputs():
    base, rl = tiny_qwen(vocab=97), tiny_qwen(vocab=101)
    with pytest.raises(ValueError, match=r"different output vocabularies: 97 vs 101"):
        check_same_output_vocab(base, rl)
    with pytest.raises(ValueError, match=r"different output vocabularies"):
        PairScorer(base, rl)
    scorer = PairScorer(base, tiny_qwen(vocab=97, seed=5))
    with pytest.raises(ValueError, match=r"outside \[0, 97\): \[97\]"):
        scorer.score([SequencePair([1, 2], [97])])
    with pytest.raises(ValueError, match="empty prompt"):
        scorer.score([SequencePair([], [3])])
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        PairScorer(base, base, chunk_size=0)


def test_head_check_catches_post_processed_logits():
    class Capped(Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 30.0 * torch.tanh(out.logits / 30.0) * 2.0
            return out

    model = tiny_qwen(seed=6)
    check_head_reproduces_logits(model, [1, 2, 3, 4])
    capped = Capped(model.config).eval()
    with pytest.raises(ValueError, match="post-processes its logits"):
        check_head_reproduces_logits(capped, [1, 2, 3, 4])


# ----------------------------------------------------------------------------- tokenizers


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=words[0])


def test_different_tokenizers_are_an_error():
    words = ["<unk>", "a", "b", "c"]
    check_same_tokenizer(word_tokenizer(words), word_tokenizer(list(words)))
    with pytest.raises(ValueError, match=r"vocabulary sizes 4 vs 5 .*only in RL: \['d'\]"):
        check_same_tokenizer(word_tokenizer(words), word_tokenizer(words + ["d"]))
    with pytest.raises(ValueError, match=r"token 'b' has id 2 in base and 3 in RL"):
        check_same_tokenizer(word_tokenizer(words), word_tokenizer(["<unk>", "a", "c", "b"]))


# ----------------------------------------------------------------------------- memory


def _peak_rss_delta(fn) -> int:
    """Bytes by which the process's peak resident set grows while `fn` runs (Linux VmHWM)."""

    def read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key)

    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")
    before = read("VmRSS:")
    fn()
    return read("VmHWM:") - before


def test_chunked_peak_memory_is_bounded():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        pytest.skip(f"peak-RSS reset unavailable here: {err}")
    vocab, length = 32768, 1024
    base, rl = tiny_qwen(vocab=vocab, seed=7, hidden=16, layers=1), tiny_qwen(vocab=vocab, seed=8, hidden=16, layers=1)
    ids = torch.randint(0, vocab, (length,)).tolist()
    seq = [SequencePair(ids[:8], ids[8:])]
    scorer = PairScorer(base, rl, chunk_size=32, batch_size=1)
    scorer.score(seq)  # warm-up: one-time allocations (thread pools, kernels) are not what we measure
    full_logits_bytes = length * vocab * 4  # one float32 [1, L, V] logits tensor: 128 MiB
    chunked = _peak_rss_delta(lambda: scorer.score(seq))

    def bare():
        with torch.no_grad():
            zb = base(torch.tensor([ids])).logits
            zr = rl(torch.tensor([ids])).logits
            return zb.sum() + zr.sum()

    unchunked = _peak_rss_delta(bare)
    assert unchunked > 1.5 * full_logits_bytes  # the meter sees the two full logit tensors
    assert chunked < 0.25 * full_logits_bytes, f"chunked scoring peaked at +{chunked / 2**20:.1f} MiB"
