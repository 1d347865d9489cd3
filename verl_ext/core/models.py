"""Loading a transformers causal LM and the one end-of-sequence rule every sampler uses."""

from __future__ import annotations


def resolve_device(device):
    """torch.device(device), or cuda when available else cpu for None."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_hf_model(path: str, device=None, dtype: str | None = None):
    """A transformers causal LM in eval mode: bfloat16 on GPU, float32 on CPU unless `dtype` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    return model.to(device).eval()


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's plus the model's generation config's (int or list)."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        candidates.append(gen_config.eos_token_id)
    for c in candidates:
        for i in c if isinstance(c, (list, tuple)) else [c]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an eos token id")
    return ids


def cut_at_eos(ids: list[int], eos_ids: list[int]) -> tuple[list[int], str]:
    """Keep tokens up to and including the first eos: (ids, "stop"), else (ids, "length")."""
    eos = set(eos_ids)
    for i, tok in enumerate(ids):
        if tok in eos:
            return ids[: i + 1], "stop"
    return ids, "length"
