"""Tiny, offline, deterministic assets for CPU runs of the real verl trainer.

`ensure_tiny_assets()` builds, from code only (no model hub):

- a byte-level BPE tokenizer over a fixed vocabulary (256 bytes + a few whole words + Qwen's
  special tokens), built as a transformers `Qwen2Tokenizer` with Qwen's chat template; any text,
  `\\boxed{82}`, digits and operators included, round-trips exactly;
- a tiny `Qwen2ForCausalLM` (hidden 64, 2 layers, 2 heads of 32, 1 kv head), briefly fine-tuned on
  the arithmetic task so that sampling at temperature 1 answers some problems right and some
  wrong: DAPO's dynamic sampling keeps only prompt groups with mixed accuracy, so a model that
  is always wrong would make verl refill forever;
- a verifiable arithmetic dataset ("Compute 7+12." -> "19") in verl's RL parquet format.

Everything is seeded and built single-threaded, so two builds give byte-identical files.
Each part is written to a temporary folder and renamed into place, and only missing (or
outdated, see `ASSET_VERSION`) parts are rebuilt.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from verl_ext.core.atomic_io import current_umask

# Bump when anything that changes the built files changes: outdated folders are rebuilt.
ASSET_VERSION = 3
DATA_SOURCE = "tiny_arith"  # graded by verl_ext.reward (last \boxed{} vs the ground truth, Math-Verify)
ENV_VAR = "TINY_ASSETS_DIR"
SEED = 1234

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
# Whole-word tokens (BPE merges); everything else is one byte-level token per character/byte.
WORDS = ["Compute", "\\boxed", "user", "assistant", "system"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 32: the smallest vLLM's CPU attention accepts
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}
OPERAND_MAX = 9  # operands in [0, OPERAND_MAX]
OPERATORS = ("+", "-")
NUM_TRAIN, NUM_VAL = 48, 16
SFT_STEPS, SFT_BATCH, SFT_LR = 250, 32, 3e-3

# What a complete build holds (a folder missing any of them is rebuilt).
DATA_FILES = ("train.parquet", "val.parquet")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TinyAssets:
    """Paths of the built assets (tokenizer files live in the model folder)."""

    root: Path
    model_dir: Path
    tokenizer_dir: Path
    train_parquet: Path
    val_parquet: Path


def default_root() -> Path:
    """`$TINY_ASSETS_DIR`, else `<repo>/.assets/tiny` (git-ignored)."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".assets" / "tiny"


def ensure_tiny_assets(root: str | Path | None = None) -> TinyAssets:
    """Build whatever is missing under `root` (default `default_root()`) and return the paths."""
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    assets = TinyAssets(
        root=root,
        model_dir=root / "model",
        tokenizer_dir=root / "model",
        train_parquet=root / "data" / "train.parquet",
        val_parquet=root / "data" / "val.parquet",
    )
    _build_if_missing(assets.root / "data", _write_dataset, DATA_FILES)
    _build_if_missing(assets.model_dir, _write_model_and_tokenizer, MODEL_FILES)
    return assets


# ----------------------------------------------------------------------------- problems


def arithmetic_problems(seed: int = SEED) -> list[tuple[str, str]]:
    """Every "a<op>b" problem with operands in [0, OPERAND_MAX], shuffled by `seed`: (question, answer)."""
    problems = [
        (f"{a}{op}{b}", str(a + b if op == "+" else a - b))
        for a in range(OPERAND_MAX + 1)
        for b in range(OPERAND_MAX + 1)
        for op in OPERATORS
    ]
    random.Random(seed).shuffle(problems)
    return problems


def prompt_text(expression: str) -> str:
    return f"Compute {expression}."


def response_text(answer: str) -> str:
    """The target the tiny model is fine-tuned to write (before the chat template's end token)."""
    return f"\\boxed{{{answer}}}"


def dataset_rows(split: str, problems: list[tuple[str, str]]) -> list[dict]:
    """verl's RL parquet schema: data_source, prompt (chat messages), ability, reward_model, extra_info."""
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": prompt_text(expr)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"index": i, "split": split, "expression": expr},
        }
        for i, (expr, answer) in enumerate(problems)
    ]


def _write_dataset(out: Path) -> None:
    import pandas as pd

    problems = arithmetic_problems()
    splits = {"train": problems[:NUM_TRAIN], "val": problems[NUM_TRAIN : NUM_TRAIN + NUM_VAL]}
    for split, rows in splits.items():
        pd.DataFrame(dataset_rows(split, rows)).to_parquet(out / f"{split}.parquet", index=False)


# ----------------------------------------------------------------------------- tokenizer


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable-unicode map, in byte order (byte b is token id b)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def word_merges(words) -> list[tuple[str, str]]:
    """Left-to-right BPE merges that build each word ("user": u+s, us+e, use+r), without repeats."""
    merges = []
    for word in words:
        for end in range(2, len(word) + 1):
            merge = (word[: end - 1], word[end - 1])
            if merge not in merges:
                merges.append(merge)
    return merges


def build_tokenizer():
    """Qwen2-style byte-level BPE over a fixed vocabulary, with Qwen's chat template.

    It is a real `Qwen2Tokenizer` (Qwen's pre-tokenizer regex, NFC, byte-level decoding), so
    every loader (AutoTokenizer, verl's hf_tokenizer) rebuilds the same tokenizer from the
    saved files. Any text round-trips; `\\boxed`, `Compute` and the chat roles are one token.
    """
    from transformers import Qwen2Tokenizer

    alphabet = byte_level_alphabet()
    merges = word_merges(WORDS)
    vocab = {tok: i for i, tok in enumerate(alphabet)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_SIZES["max_position_embeddings"],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------- model


@contextmanager
def deterministic_torch(seed: int):
    """Seed torch and run single-threaded (thread count changes float reduction order)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_model(tokenizer):
    """A fresh tiny `Qwen2ForCausalLM` whose special ids match `tokenizer`."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.eos_token_id,
        rope_theta=10000.0,
        torch_dtype="float32",
        **MODEL_SIZES,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    return model


def sft_batches(tokenizer, problems, steps: int, batch_size: int, seed: int):
    """Yield (input_ids, attention_mask, labels) for chat prompt -> `\\boxed{answer}<|im_end|>`; loss on the answer only."""
    import torch

    rng = random.Random(seed)
    encoded = []
    for expr, answer in problems:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(expr)}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response_text(answer) + IM_END, add_special_tokens=False)["input_ids"]
        encoded.append((p_ids, r_ids))
    for _ in range(steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), -100)
        for row, (p, r) in enumerate(batch):
            seq = p + r
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(p) : len(seq)] = torch.tensor(r)
        yield ids, mask, labels


def sft_optimizer(model, lr: float = SFT_LR):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def finetune(model, tokenizer, problems, steps: int = SFT_STEPS, seed: int = SEED, optimizer=None) -> list[float]:
    """A short AdamW fine-tune so the model writes `\\boxed{...}` answers, right only part of the time.

    Pass the same `optimizer` (`sft_optimizer`) to continue a fine-tune in chunks.
    """
    optimizer = optimizer if optimizer is not None else sft_optimizer(model)
    losses = []
    model.train()
    for ids, mask, labels in sft_batches(tokenizer, problems, steps, SFT_BATCH, seed):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _write_model_and_tokenizer(out: Path) -> None:
    with deterministic_torch(SEED):
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        losses = finetune(model, tokenizer, arithmetic_problems(seed=SEED + 1))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "sft_losses.json").write_text(json.dumps({"first": losses[0], "last": losses[-1]}, indent=1))


# ----------------------------------------------------------------------------- atomic builds


def _stamp(path: Path) -> Path:
    return path / "ASSET_VERSION"


def _is_current(path: Path, files: tuple[str, ...]) -> bool:
    """`path` holds all `files` and was built by this ASSET_VERSION."""
    stamp = _stamp(path)
    complete = all((path / name).is_file() for name in files)
    return complete and stamp.is_file() and stamp.read_text().strip() == str(ASSET_VERSION)


def _build_if_missing(target: Path, write, files: tuple[str, ...]) -> None:
    """Run `write(tmp_dir)` and rename tmp_dir to `target`, unless `target` is complete and current."""
    if _is_current(target, files):
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        _stamp(tmp).write_text(f"{ASSET_VERSION}\n")
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
        if target.exists():  # outdated version: replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_current(target, files):  # someone else built it concurrently: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(ensure_tiny_assets())


# ----------------------------------------------------------------------------- stand-in RL model

STAND_IN_SEED = 1  # ε's seed: one stand-in per noise level, the same for every command


def perturbed_model(model, noise: float, seed: int = STAND_IN_SEED):
    """A deterministic stand-in "RL" model (not RL-trained): a copy with, per parameter tensor,

        θ' = θ + noise · std(θ) · ε,   ε ~ N(0, I) from `seed`,

    tensors visited in name order (std(θ) = |θ| for a one-element tensor). Used by the tiny
    defaults of the analysis and the sweeps, whose figures label the pair a stand-in."""
    import copy

    import torch

    rl = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(rl.named_parameters(), key=lambda kv: kv[0]):
            std = p.float().std() if p.numel() > 1 else p.float().abs()
            p.add_((noise * std * torch.randn(p.shape, generator=g)).to(p.dtype))
    return rl


def save_perturbed_copy(src: str | Path, dst: str | Path, noise: float, seed: int = STAND_IN_SEED) -> Path:
    """`perturbed_model` of the model at `src`, saved with its tokenizer to `dst` (written to a
    temporary folder and renamed; reused when `dst` already holds the same perturbation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = Path(dst)
    stamp = dst / "PERTURBATION"
    tag = json.dumps({"src": str(src), "noise": noise, "seed": seed})
    if stamp.is_file() and stamp.read_text() == tag:
        return dst
    model = perturbed_model(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32), noise, seed)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(tmp)
    (tmp / "PERTURBATION").write_text(tag)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst
