"""Grouped-query attention through a padding mask without expanding the KV heads, on CPU.

Two-model decoding attends through a mask as soon as rows differ in length (left padding) or a
speculative round was cut (masked-out cache columns, `experimental.py`). transformers' `sdpa` attention then repeats every KV
head `num_key_value_groups` times before calling `scaled_dot_product_attention`, because on CUDA
`enable_gqa` with a mask falls back to the slow math kernel; the CPU kernel takes the mask and
`enable_gqa` together, and skipping the copies is measurably faster (`benchmarks/bench_decoding.py`;
numbers in docs/benchmarks.md). Everywhere else (no mask, CUDA, no grouped heads) this is transformers' `sdpa` itself.

`cpu_grouped_query_attention(models)` switches models using `sdpa` to it for the duration of a
`with` block (registered with transformers' attention and mask interfaces under `SDPA_GQA`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA_GQA = "sdpa_gqa_masked_cpu"


def sdpa_gqa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
    """transformers' `sdpa_attention_forward`, except that on CPU with a mask and grouped KV heads the
    heads are shared through `enable_gqa` instead of copied. query [B, H, q, d], key/value
    [B, H_kv, k, d]; returns ([B, q, H, d], None) like transformers."""
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or query.device.type != "cpu" or groups == 1 or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA_GQA, sdpa_gqa_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_GQA, sdpa_mask)  # the same masks as `sdpa`


@contextmanager
def cpu_grouped_query_attention(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Within the block, CPU models whose attention is `sdpa` use `sdpa_gqa_attention_forward`;
    their setting is restored on exit."""
    switched = []
    for model in models:
        config = model.config
        if getattr(config, "_attn_implementation", None) == "sdpa" and next(model.parameters()).device.type == "cpu":
            config._attn_implementation = SDPA_GQA
            switched.append(config)
    try:
        yield
    finally:
        for config in switched:
            config._attn_implementation = "sdpa"
