"""The paper's prompt: the problem, a newline, then "Please reason step by step, and put your final
answer within \\boxed{}.", in the model's chat template with the assistant turn opened."""

from __future__ import annotations

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def format_problem(problem: str, suffix: str = PROMPT_SUFFIX) -> str:
    """User message: the problem, a newline, the instruction suffix."""
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem must be a non-empty string, got {problem!r}")
    return f"{problem.strip()}\n{suffix}" if suffix else problem.strip()


def problem_to_messages(problem: str, suffix: str = PROMPT_SUFFIX) -> list[dict[str, str]]:
    """Chat messages for a problem: one user turn (`format_problem`)."""
    return [{"role": "user", "content": format_problem(problem, suffix)}]


def encode_messages(tokenizer, messages: list[dict[str, str]], use_chat_template: bool = True) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template with the assistant turn opened.

    `use_chat_template=False`: the user turns' text joined by newlines, without special tokens
    (for base models without a template).
    """
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template: "
                "give one or encode without it (use_chat_template=False)"
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_problem(tokenizer, problem: str, suffix: str = PROMPT_SUFFIX, use_chat_template: bool = True) -> list[int]:
    """`encode_messages(problem_to_messages(problem, suffix))`."""
    return encode_messages(tokenizer, problem_to_messages(problem, suffix), use_chat_template)
