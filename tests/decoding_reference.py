"""Shared by the decoding tests (engine, static, experimental, sampler): tiny float64 model pairs,
an independent cache-free NumPy reference of Alg. 1 / Eq. 7, the rules every decoder is checked
under, and the batch-independence check. Importable by name: `tests/conftest.py` puts this folder
on sys.path (the tests use `--import-mode=importlib`).

The reference re-runs each model on the whole prefix at every step and implements nucleus sampling,
the criteria, Eq. 7 and the official top-k approximation with NumPy; it shares only the random
streams (`rng`, tested on its own).
"""

import copy
import random

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.core import rng
from verl_ext.decoding.engine import Request, TwoModelDecoder
from verl_ext.decoding.sampler import DecodingRule

EOS, PAD = 1, 0


def make_models(vocab=40, seed=0, eos_boost=6.0, perturb=0.6):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    base = Qwen2ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(8.0)  # peaked enough that top-p and the criteria bite
        base.lm_head.weight[EOS] += eos_boost * base.model.norm.weight  # EOS is likely at some steps
    rl = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(perturb * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return base, rl


# ----------------------------------------------------------------------------- reference


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def np_nucleus(p, top_p):
    """Keep the most probable tokens until their mass reaches top_p (ties broken by index)."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    keep, mass = np.zeros(len(p), dtype=bool), 0.0
    for i in order:
        if mass >= top_p:
            break
        keep[i], mass = True, mass + p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def np_draw(p, u):
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return min(i, int(np.nonzero(p > 0)[0][-1]))


def np_score(name, lb, lr, y_hat, u, top_k):
    """(score, fired-direction) with NumPy; on the base top-k view when top_k > 0."""
    delta = lr[y_hat] - lb[y_hat]
    if top_k:
        ids = np.argsort(-lb, kind="stable")[:top_k]
        rl_ids = np.argsort(-lr, kind="stable")[:top_k]
        rl_min = lr[rl_ids].min()
        b = lb[ids] - np.log(np.exp(lb[ids]).sum())
        r = np.where(np.isin(ids, rl_ids), lr[ids], rl_min)
        r = r - np.log(np.exp(r).sum())
        delta = (lr[y_hat] if y_hat in rl_ids else rl_min) - lb[y_hat]
        lb, lr = b, r
    P, Q = np.exp(lb), np.exp(lr)
    return {
        "entropy_base": -(P * lb).sum(),
        "entropy_rl": -(Q * lr).sum(),
        "kl_rl_base": (Q * (lr - lb)).sum(),
        "kl_base_rl": (P * (lb - lr)).sum(),
        "avg_kl": 0.5 * ((Q * (lr - lb)).sum() + (P * (lb - lr)).sum()),
        "delta_logp": delta,
        "random": u,
        "none": np.nan,
        "all": np.nan,
    }[name]


def np_fires(name, s, tau):
    if name in ("none", "all"):
        return name == "all"
    return s < tau if name in ("delta_logp", "random") else s > tau


def np_resample(lb, lr, y_hat, u, rule):
    """y ~ q where the gate fired on ŷ: a fresh inverse-CDF draw (independent), or ŷ kept with
    probability min(1, q(ŷ)/p_F(ŷ)) and else a draw from (q − p_F)₊ (maximal)."""
    k, gamma = rule.base_top_k_approximation, rule.resample_gamma
    q = np.zeros(len(lb))
    if k:
        ids = np.argsort(-lb, kind="stable")[:k]
        rl_ids = np.argsort(-lr, kind="stable")[:k]
        b = lb[ids] - np.log(np.exp(lb[ids]).sum())
        r = np.where(np.isin(ids, rl_ids), lr[ids], lr[rl_ids].min())
        r = r - np.log(np.exp(r).sum())
        q[ids] = np_nucleus(np_softmax(((1 + gamma) * r - gamma * b) / rule.temperature), rule.top_p)
        delta = np.where(np.isin(np.arange(len(lb)), rl_ids), lr, lr[rl_ids].min()) - lb
    else:
        with np.errstate(divide="ignore"):
            q0 = np.log(np_softmax((1 + gamma) * lr - gamma * lb))
        q = np_nucleus(np_softmax(q0 / rule.temperature), rule.top_p)
        delta = lr - lb
    if rule.coupling == "independent":
        return np_draw(q, u)
    p = np_nucleus(np_softmax((lb if rule.propose_from == "base" else lr) / rule.temperature), rule.top_p)
    if rule.criterion == "delta_logp":
        p = p * (delta < rule.threshold)
    p = p / p.sum()
    accept = min(1.0, q[y_hat] / p[y_hat])
    residual = np.clip(q - p, 0, None)
    if u < accept or residual.sum() <= 0:
        return y_hat
    return np_draw(residual, (u - accept) / (1 - accept))


def reference_decode(base, rl, prompt, stream_id, seed, rule, max_new):
    key = rng.sequence_keys(seed, torch.tensor([stream_id]))
    seq, tokens, fired, scores = list(prompt), [], [], []
    for t in range(max_new):
        with torch.no_grad():
            lb = torch.log_softmax(base(torch.tensor([seq])).logits[0, -1], -1).numpy()
            lr = torch.log_softmax(rl(torch.tensor([seq])).logits[0, -1], -1).numpy()
        u0, ug, ur = (rng.uniforms(key, torch.tensor([t]), s).item() for s in range(3))
        prop = lb if rule.propose_from == "base" else lr
        y = np_draw(np_nucleus(np_softmax(prop / rule.temperature), rule.top_p), u0)
        s = np_score(rule.criterion, lb, lr, y, ug, rule.base_top_k_approximation)
        g = bool(np_fires(rule.criterion, s, rule.threshold))
        if g:
            y = np_resample(lb, lr, y, ur, rule)
        seq.append(y)
        tokens.append(y)
        fired.append(g)
        scores.append(s)
        if y == EOS:
            break
    return tokens, fired, scores


def decoder(base, rl, rule, **kw):
    kw.setdefault("max_new_tokens", 10)
    return TwoModelDecoder(base, rl, rule, eos_token_ids=[EOS], pad_token_id=PAD, **kw)


PROMPTS = [[5, 6, 7], [9], [3, 4, 11, 12, 13, 2], [20, 21], [8, 8, 8, 8], [30]]
REQUESTS = [Request(p, stream_id=100 + i) for i, p in enumerate(PROMPTS)]

RULES = {
    "delta_logp": DecodingRule("delta_logp", -0.4, top_p=0.8),
    "avg_kl-extrapolate": DecodingRule("avg_kl", 0.8, "extrapolate", gamma=0.3, temperature=0.9, top_p=0.9),
    "entropy_base": DecodingRule("entropy_base", 1.2, top_p=1.0),
    "kl_rl_base": DecodingRule("kl_rl_base", 1.0, top_p=0.9),
    "random": DecodingRule("random", 0.3, "extrapolate", gamma=0.5, top_p=0.9),
    "table1-rl-proposal": DecodingRule("delta_logp", 0.5, "extrapolate", gamma=0.4, propose_from="rl", top_p=0.9),
    "official-top5": DecodingRule("delta_logp", -0.3, "extrapolate", gamma=0.2, top_p=0.7, base_top_k_approximation=5),
    "all-gamma0": DecodingRule("all", 0.0, "extrapolate", gamma=0.0, top_p=0.8),
    # every other criterion, and the gates decided from the proposer alone in each setting
    "entropy_rl": DecodingRule("entropy_rl", 1.2, top_p=0.9),
    "kl_base_rl": DecodingRule("kl_base_rl", 0.8, "extrapolate", gamma=0.2, top_p=0.9),
    "random-replace": DecodingRule("random", 0.25, top_p=0.8),
    "entropy_rl-rl-proposal": DecodingRule("entropy_rl", 1.2, "extrapolate", gamma=0.3, propose_from="rl", top_p=0.9),
    "entropy_base-top5": DecodingRule("entropy_base", 1.0, top_p=0.8, base_top_k_approximation=5),
    "none": DecodingRule("none", 0.0, top_p=0.8),
    "independent-coupling": DecodingRule("avg_kl", 0.8, top_p=0.9, coupling="independent"),
    "official-top5-independent": DecodingRule("delta_logp", -0.3, "extrapolate", gamma=0.2, top_p=0.7,
                                              base_top_k_approximation=5, coupling="independent"),
}
PROPOSER_ONLY = {"entropy_base", "random", "all-gamma0", "random-replace", "entropy_rl-rl-proposal",
                 "entropy_base-top5"}


def _sequence_histograms(results_a, results_b, key=lambda r: tuple(r.tokens)):
    a, b = [key(r) for r in results_a], [key(r) for r in results_b]
    keys = sorted(set(a) | set(b))
    ca = np.array([a.count(k) for k in keys])
    cb = np.array([b.count(k) for k in keys])
    big = (ca + cb) >= 10  # pool rare sequences into one bin
    return np.stack([np.append(ca[big], ca[~big].sum()), np.append(cb[big], cb[~big].sum())])


def check_batched_equals_unbatched(make_decoder, rule=None):
    """Every request alone vs in shuffled batches of 2, 6 and 4 (admitting 1, all, 3 at a time): the same
    tokens and flags, scores to 1e-9. `make_decoder(rule, **kw)` builds the decoder under test."""
    rule = rule or RULES["delta_logp"]
    alone = [make_decoder(rule, seed=3, max_batch_size=1).generate([r])[0] for r in REQUESTS]
    shuffled = REQUESTS[:]
    random.Random(0).shuffle(shuffled)
    for batch, admit in ((2, 1), (6, None), (4, 3)):
        res = make_decoder(rule, seed=3, max_batch_size=batch, admit_min=admit).generate(shuffled)
        by_stream = {r.stream_id: x for r, x in zip(shuffled, res)}
        for req, ref in zip(REQUESTS, alone):
            got = by_stream[req.stream_id]
            assert (got.tokens, got.replaced) == (ref.tokens, ref.replaced)
            np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-9, atol=1e-12)
