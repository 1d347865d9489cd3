"""The CPU grouped-query attention used while decoding: transformers' `sdpa` numbers, no KV copies."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.core.sampling import left_pad
from verl_ext.decoding.attention import SDPA_GQA, cpu_grouped_query_attention


def tiny_gqa_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(cfg).double().eval()


def key_heads_seen(monkeypatch) -> list[int]:
    """Spy: the KV heads of every `scaled_dot_product_attention` call (expanded: 4, shared: 2)."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append(key.shape[1])
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@torch.no_grad()
def test_masked_attention_shares_the_kv_heads_and_gives_sdpa_logits(monkeypatch):
    model = tiny_gqa_model()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_token_id=0)  # rows of different lengths
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    seen = key_heads_seen(monkeypatch)
    reference = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert seen and set(seen) == {4}  # transformers copies the 2 KV heads to the 4 query heads under a mask
    seen.clear()
    with cpu_grouped_query_attention([model]):
        assert model.config._attn_implementation == SDPA_GQA
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        # one decoding step on the cache, through the padding mask
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step = model(input_ids=ids[:, -1:], attention_mask=step_mask, position_ids=pos[:, -1:] + 1,
                     past_key_values=out.past_key_values).logits
    assert seen and set(seen) == {2}
    assert model.config._attn_implementation == "sdpa"  # restored
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], reference[real], rtol=0, atol=1e-12)
    full = torch.cat([ids, ids[:, -1:]], 1)
    expected = model(input_ids=full, attention_mask=step_mask, position_ids=torch.cat([pos, pos[:, -1:] + 1], 1)).logits
    torch.testing.assert_close(step[:, -1], expected[:, -1], rtol=0, atol=1e-12)


def test_the_setting_is_restored_on_error_and_other_implementations_are_left_alone():
    model, eager = tiny_gqa_model(), tiny_gqa_model()
    eager.config._attn_implementation = "eager"
    with pytest.raises(RuntimeError, match="boom"), cpu_grouped_query_attention([model, eager]):
        assert (model.config._attn_implementation, eager.config._attn_implementation) == (SDPA_GQA, "eager")
        raise RuntimeError("boom")
    assert (model.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")


@pytest.mark.parametrize("draft_len", [1, 3], ids=["step loop", "speculative rounds"])
def test_two_model_decoding_never_copies_kv_heads_and_restores_the_models(monkeypatch, draft_len):
    from verl_ext.decoding.engine import Request, TwoModelDecoder
    from verl_ext.decoding.experimental import SpeculativeTwoModelDecoder
    from verl_ext.decoding.sampler import DecodingRule

    base, rl = tiny_gqa_model(), tiny_gqa_model()
    rounds = {} if draft_len == 1 else {"draft_len": draft_len}  # rounds of 3 queries a row and step
    decoder = (SpeculativeTwoModelDecoder if rounds else TwoModelDecoder)(
        base, rl, DecodingRule("delta_logp", -0.1, top_p=0.9), eos_token_ids=[1], pad_token_id=0, max_new_tokens=6,
        max_batch_size=2, admit_min=1, **rounds)
    seen = key_heads_seen(monkeypatch)
    results = decoder.generate([Request([5, 6, 7, 8], 0), Request([9], 1), Request([10, 11], 2)])
    assert all(r.tokens for r in results)
    assert seen and set(seen) == {2}
    assert base.config._attn_implementation == rl.config._attn_implementation == "sdpa"
