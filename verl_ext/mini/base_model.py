"""Stage 1 of the miniature: a base model that is partly correct on the arithmetic task.

SFT (the tiny assets' recipe: chat prompt -> `\\boxed{answer}`, loss on the answer) runs in
chunks; after each chunk the model is graded by sampling, and training stops at the first chunk
whose accuracy lies in the target band (e.g. 20-50%): RLVR needs a base that is right sometimes
(groups with mixed rewards) and has room to improve. Deterministic: seeded, single-threaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from verl_ext.tiny_assets import (
    build_model,
    build_tokenizer,
    deterministic_torch,
    finetune,
    prompt_text,
    sft_optimizer,
)


class BaseModelError(RuntimeError):
    pass


@dataclass
class SFTTrace:
    """Accuracy after each chunk: what the stopping rule saw."""

    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    stopped_at: int | None = None


def sampled_accuracy(model, tokenizer, problems, n: int, max_new_tokens: int, seed: int) -> float:
    """Mean correctness of `n` samples per problem at temperature 1, top-p 1 (the RL rollout setting)."""
    from verl_ext.core.prompts import encode_messages
    from verl_ext.generation import sample_responses
    from verl_ext.reward import grade_many

    prompts = [encode_messages(tokenizer, [{"role": "user", "content": prompt_text(q)}]) for q, _ in problems]
    gens = sample_responses(
        model,
        tokenizer,
        prompts,
        n,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=256,
        show_progress=False,
    )
    truths = [problems[g.prompt_index][1] for g in gens]
    correct = grade_many([g.response_text for g in gens], truths, num_threads=1)
    return sum(correct) / len(correct)


def train_base_model(
    out_dir: str | Path,
    problems: list[tuple[str, str]],
    eval_problems: list[tuple[str, str]],
    *,
    band: tuple[float, float],
    chunk_steps: int,
    max_steps: int,
    eval_samples: int,
    max_new_tokens: int,
    seed: int,
) -> SFTTrace:
    """Fine-tune a fresh tiny Qwen2 on `problems` until its sampled accuracy on `eval_problems`
    enters `band` = [low, high]; save it (with the tokenizer) to `out_dir`.

    Raises BaseModelError naming the accuracies seen when no chunk boundary lands in the band
    (a smaller `chunk_steps` or a larger `max_steps` is the fix).
    """
    low, high = band
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"base.target_accuracy={list(band)} is invalid: need 0 <= low < high <= 1")
    if chunk_steps < 1 or max_steps < chunk_steps:
        raise ValueError(f"need 1 <= base.chunk_steps <= base.max_steps, got {chunk_steps} and {max_steps}")
    trace = SFTTrace()
    with deterministic_torch(seed):
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        optimizer = sft_optimizer(model)
        for chunk, done in enumerate(range(chunk_steps, max_steps + 1, chunk_steps)):
            losses = finetune(model, tokenizer, problems, steps=chunk_steps, seed=seed + chunk, optimizer=optimizer)
            acc = sampled_accuracy(model, tokenizer, eval_problems, eval_samples, max_new_tokens, seed)
            trace.steps.append(done)
            trace.accuracy.append(acc)
            trace.loss.append(sum(losses) / len(losses))
            print(f"[mini/base] SFT step {done}: loss {trace.loss[-1]:.3f}, sampled accuracy {acc:.3f}", flush=True)
            if low <= acc <= high:
                trace.stopped_at = done
                break
            if acc > high:
                break
    if trace.stopped_at is None:
        seen = ", ".join(f"{s}: {a:.2f}" for s, a in zip(trace.steps, trace.accuracy))
        raise BaseModelError(
            f"no SFT checkpoint reached the target accuracy band [{low}, {high}] (step: accuracy = {seen}); "
            "lower base.chunk_steps or raise base.max_steps"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "sft_trace.json").write_text(json.dumps(asdict(trace), indent=1))
    return trace
