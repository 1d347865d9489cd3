"""The tiny offline assets (verl_ext.tiny_assets): deterministic, loadable, in verl's formats."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from verl_ext import tiny_assets
from verl_ext.tiny_assets import DATA_SOURCE, ensure_tiny_assets, prompt_text, response_text


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def assets():
    return ensure_tiny_assets()


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.tokenizer_dir)


def test_two_builds_are_byte_identical(tmp_path, monkeypatch):
    """Same code path as the real build, with a short fine-tune to keep the test fast."""
    monkeypatch.setattr(tiny_assets, "SFT_STEPS", 5)
    first, second = ensure_tiny_assets(tmp_path / "a"), ensure_tiny_assets(tmp_path / "b")
    hashes_a, hashes_b = file_hashes(first.root), file_hashes(second.root)
    assert "model/model.safetensors" in hashes_a and "data/train.parquet" in hashes_a
    assert hashes_a == hashes_b


def test_build_is_idempotent_and_rebuilds_only_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_assets, "SFT_STEPS", 2)
    assets = ensure_tiny_assets(tmp_path)
    model_file = assets.model_dir / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    assets.val_parquet.unlink()
    again = ensure_tiny_assets(tmp_path)
    assert again == assets
    assert again.val_parquet.is_file(), "a missing data file is rebuilt"
    assert model_file.stat().st_mtime_ns == stamp, "the model was rebuilt although it was complete"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build folders were left behind"


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_ASSETS_DIR", str(tmp_path / "x"))
    assert tiny_assets.default_root() == tmp_path / "x"
    monkeypatch.delenv("TINY_ASSETS_DIR")
    assert tiny_assets.default_root().parts[-2:] == (".assets", "tiny")


@pytest.mark.parametrize(
    "text", ["\\boxed{123}", "Compute 37+45.", "\\boxed{-7}\n", "x = (a*b)/2 ? é∑", "user assistant"]
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_tokenizer_specials_and_chat_template(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1  # verl's Qwen token builder needs this
    assert len(tokenizer.encode("\\boxed", add_special_tokens=False)) == 1
    messages = [{"role": "user", "content": prompt_text("3+4")}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nCompute 3+4.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text


def test_dataset_rows_follow_verls_schema(assets):
    train, val = pd.read_parquet(assets.train_parquet), pd.read_parquet(assets.val_parquet)
    assert set(train.columns) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert len(train) == tiny_assets.NUM_TRAIN and len(val) == tiny_assets.NUM_VAL
    for split, frame in (("train", train), ("val", val)):
        for i, row in enumerate(frame.itertuples()):
            assert row.data_source == DATA_SOURCE
            (message,) = list(row.prompt)
            assert message["role"] == "user"
            expression = re.fullmatch(r"Compute (\d+[+-]\d+)\.", message["content"]).group(1)
            assert row.reward_model == {"style": "rule", "ground_truth": str(eval(expression))}
            assert row.extra_info["index"] == i and row.extra_info["split"] == split
    assert not set(train.extra_info.map(lambda e: e["expression"])) & set(val.extra_info.map(lambda e: e["expression"]))


def test_verls_dataset_loads_the_parquet(assets, tokenizer):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create({"max_prompt_length": 32, "filter_overlong_prompts": True, "return_raw_chat": True})
    dataset = RLHFDataset(str(assets.train_parquet), tokenizer, config)
    assert len(dataset) == tiny_assets.NUM_TRAIN, "no prompt should be filtered as overlong at 32 tokens"
    item = dataset[0]
    assert item["raw_prompt"][0]["content"].startswith("Compute ")
    assert item["reward_model"]["ground_truth"]


def test_model_loads_and_matches_the_tokenizer(assets, tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    # head_dim 64 / 2 = 32: the smallest vLLM's CPU attention accepts
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert tokenizer.eos_token_id in GenerationConfig.from_pretrained(assets.model_dir).eos_token_id


def test_model_answers_some_problems_right_and_some_wrong(assets, tokenizer):
    """DAPO keeps only groups with mixed accuracy: at temperature 1 the model must be neither always
    right nor always wrong, else verl's dynamic sampling refills forever."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir).eval()
    val = pd.read_parquet(assets.train_parquet).head(16)
    texts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in val.prompt]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=8, num_return_sequences=4)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    truths = [gt["ground_truth"] for gt in val.reward_model for _ in range(4)]
    correct = torch.tensor([a.strip() == response_text(t) for a, t in zip(answers, truths)]).view(16, 4)
    mixed = ((correct.sum(1) > 0) & (correct.sum(1) < 4)).float().mean().item()
    assert 0.1 < correct.float().mean().item() < 0.9
    assert mixed >= 0.25, f"only {mixed:.0%} of prompt groups have mixed accuracy"


def test_stand_in_rl_model_is_theta_plus_noise_times_std_times_a_seeded_normal():
    """perturbed_model: θ' − θ = noise·std(θ)·ε per tensor, ε ~ N(0, 1) seeded (same seed, same
    model), the original untouched; noise 0 is the same model."""
    import torch

    from verl_ext.tiny_assets import perturbed_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = perturbed_model(model, 0.2, seed=1), perturbed_model(model, 0.2, seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, perturbed_model(model, 0.2, seed=2).state_dict()[k]) for k, v in a.state_dict().items())
    weight = before["0.weight"]
    eps = (a.state_dict()["0.weight"] - weight) / (0.2 * weight.std())
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.05  # 4096 standard normals
    bias = before["1.bias"]  # one element: its scale is |θ|
    assert abs((a.state_dict()["1.bias"] - bias).item()) <= 0.2 * abs(bias.item()) * 5
    assert all(torch.equal(v, perturbed_model(model, 0.0).state_dict()[k]) for k, v in before.items())
