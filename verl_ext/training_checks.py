"""Every training setting and input that would fail later inside Ray, or train on garbage, checked on the driver.

`recipe.dapo_reweight.main` calls `check_training_config` while the config is built and
`check_training_inputs` before Ray starts. Each raises `verl_ext.core.checks.ConfigError` with one line
naming the key, the bad value and what is valid (`actor_rollout_ref.rollout.top_p=1.5 is invalid;
valid: a number in (0, 1]`), so a bad run ends in seconds instead of a minute later with a message
from deep inside a worker (verl's replay buffer, vLLM's sampling params, an assert in the loss).

What is checked, and why:
- sampling (`rollout.*` and `rollout.val_kwargs.*`): temperature (> 0 for training: verl divides
  the logits by it when it recomputes log-probs; >= 0 for validation, 0 = greedy), top_p in (0, 1],
  top_k an integer >= -1 (-1 and 0 mean off);
- `actor.optim.lr` a finite number > 0; clip ratios: `clip_ratio`, `clip_ratio_low` in (0, 1)
  (ratios below 1 - low are clipped: low >= 1 clips nothing from below), `clip_ratio_high` > 0,
  dual-clip `clip_ratio_c` > 1 (verl asserts it inside the loss);
- the checkpoint directory is writable;
- the model (and tokenizer) source exists: a local directory, or a hub id that is cached when the
  hub is offline;
- every local training / validation parquet has rows and the columns verl reads (the prompt key,
  the reward function's data-source key, `reward_model` with a ground truth);
- prompts longer than `data.max_prompt_length` (tokenized as verl's RLHFDataset does: the chat
  template with the generation prompt): verl drops them when `data.filter_overlong_prompts`, and
  fails mid-run on them with `data.truncation=error` otherwise. How many are dropped is reported;
  a file whose prompts are all too long is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_ext.core.checks import (
    ConfigError,
    check_flag,
    check_list,
    check_model_source,
    check_number,
    check_writable_dir,
    invalid,
    is_remote,
)

ROLLOUT = "actor_rollout_ref.rollout"
ACTOR = "actor_rollout_ref.actor"


def check_sampling(params: Mapping, key: str, *, training: bool) -> None:
    """temperature (> 0 when `training`, else >= 0), top_p in (0, 1], top_k an integer >= -1."""
    check_number(params.get("temperature", 1.0), f"{key}.temperature", low=0, low_open=training)
    check_number(params.get("top_p", 1.0), f"{key}.top_p", low=0, high=1, low_open=True)
    top_k = params.get("top_k", -1)
    check_number(top_k, f"{key}.top_k", low=-1, integer=True)


def check_optim(optim: Mapping, key: str) -> None:
    """The learning rate is a finite number > 0."""
    check_number(optim.get("lr"), f"{key}.lr", low=0, low_open=True)


def check_clip_ratios(actor: Mapping, key: str = ACTOR) -> None:
    """PPO clip ratios: clip_ratio and clip_ratio_low in (0, 1), clip_ratio_high > 0, clip_ratio_c > 1.

    A null low / high falls back to clip_ratio in verl, so null passes for those two.
    """
    check_number(actor.get("clip_ratio", 0.2), f"{key}.clip_ratio", low=0, high=1, low_open=True, high_open=True)
    check_number(
        actor.get("clip_ratio_low"), f"{key}.clip_ratio_low", low=0, high=1, low_open=True, high_open=True,
        allow_none=True,
    )
    check_number(actor.get("clip_ratio_high"), f"{key}.clip_ratio_high", low=0, low_open=True, allow_none=True)
    check_number(actor.get("clip_ratio_c", 3.0), f"{key}.clip_ratio_c", low=1, low_open=True)


def check_training_config(config) -> None:
    """The composed training config's sampling, optimiser and clipping settings (see the module docstring)."""
    check_flag(config.get("dry_run", False), "dry_run")
    check_flag((config.get("run") or {}).get("merge_at_end", True), "run.merge_at_end")
    policy_loss, key = config.actor_rollout_ref.actor.policy_loss, f"{ACTOR}.policy_loss"
    check_flag(policy_loss.get("ppl_iqr_filter", False), f"{key}.ppl_iqr_filter")
    # the scheme's own limits (dominate: alpha < 1; clamp low <= high) are WeightingSpec's; here the types
    check_number(policy_loss.get("alpha"), f"{key}.alpha", low=0, allow_none=True)
    if policy_loss.get("ppl_clamp") is not None:
        clamp = check_list(policy_loss.ppl_clamp, f"{key}.ppl_clamp",
                           lambda v, k: check_number(v, k, low=0, low_open=True))
        if len(clamp) != 2:
            raise invalid(f"{key}.ppl_clamp", clamp, "[low, high], two numbers > 0")
    rollout = config.actor_rollout_ref.rollout
    check_flag(rollout.get("full_determinism", False), f"{ROLLOUT}.full_determinism")
    check_sampling(rollout, ROLLOUT, training=True)
    check_sampling(rollout.get("val_kwargs") or {}, f"{ROLLOUT}.val_kwargs", training=False)
    actor = config.actor_rollout_ref.actor
    check_optim(actor.optim, f"{ACTOR}.optim")
    check_clip_ratios(actor)
    poll_s = config.get("replay_buffer_poll_s")
    check_number(poll_s, "replay_buffer_poll_s", low=0, low_open=True, allow_none=True)
    # verl passes these to verl_ext.reward.compute_score only at the first reward: check them now
    reward_kwargs = ((config.get("reward") or {}).get("custom_reward_function") or {}).get("reward_kwargs") or {}
    if "timeout_s" in reward_kwargs:
        key = "reward.custom_reward_function.reward_kwargs.timeout_s"
        check_number(reward_kwargs["timeout_s"], key, low=0, low_open=True)


# ---------------------------------------------------------------------------------------- inputs


def as_file_list(files: Any) -> list[str]:
    """`data.train_files` as a list of strings (hydra gives a string or a list)."""
    return [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]


def read_parquet_checked(path: str, key: str, required: Sequence[str]):
    """The parquet file at `path` as a pyarrow Table, refused when missing, unreadable, empty, or
    lacking one of the `required` columns (the message names the file and the missing key)."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise ConfigError(f"{key}: data file {path!r} does not exist")
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise ConfigError(f"{key}: {path} is not a readable parquet file ({err})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"{key}: {path} has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(table.column_names) or 'none'})"
        )
    if table.num_rows == 0:
        raise ConfigError(f"{key}: {path} has no rows")
    return table


def check_ground_truths(rows: Iterable[Any], path: str, key: str) -> None:
    """Every `reward_model` entry carries a non-empty `ground_truth`."""
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or row.get("ground_truth") in (None, ""):
            raise ConfigError(f"{key}: {path} row {i} has no reward_model.ground_truth")


@dataclass(frozen=True)
class PromptLengthReport:
    """How many prompts of one file are longer than the limit (verl drops or refuses them)."""

    path: str
    total: int
    too_long: int
    longest: int

    def line(self, max_len: int) -> str:
        return (
            f"{self.path}: {self.too_long} of {self.total} prompts are longer than data.max_prompt_length={max_len} "
            f"tokens (longest {self.longest})"
        )


def prompt_length_report(path: str, lengths: Sequence[int], max_len: int) -> PromptLengthReport:
    """Count the prompts whose token length exceeds `max_len`."""
    return PromptLengthReport(path, len(lengths), sum(n > max_len for n in lengths), max(lengths, default=0))


def overlong_mode(data_cfg: Mapping) -> str:
    """What verl does with a prompt longer than data.max_prompt_length: "drop" (filter_overlong_prompts),
    "truncate" (truncation left / right / middle) or "error" (truncation=error: the run fails on it)."""
    if data_cfg.get("filter_overlong_prompts", False):
        return "drop"
    return "error" if data_cfg.get("truncation", "error") == "error" else "truncate"


def check_prompt_lengths(report: PromptLengthReport, max_len: int, key: str, mode: str) -> str | None:
    """None when every prompt fits; else a warning line saying what verl does with the long ones
    (`mode`, see `overlong_mode`). ConfigError when verl would drop them all, or fail on them."""
    if report.too_long == 0:
        return None
    if mode == "drop" and report.too_long == report.total:
        raise ConfigError(f"{key}: {report.line(max_len)}: verl would drop them all; raise data.max_prompt_length")
    if mode == "error":
        raise ConfigError(
            f"{key}: {report.line(max_len)}, and with data.filter_overlong_prompts=false and data.truncation=error "
            "verl fails on the first one; set data.filter_overlong_prompts=true (drops them) or raise "
            "data.max_prompt_length"
        )
    done = "drops them (data.filter_overlong_prompts=true)" if mode == "drop" else "truncates them (data.truncation)"
    return f"{key}: {report.line(max_len)}: verl {done}"


def chat_prompt_lengths(tokenizer, prompts: Iterable[Any], chat_kwargs: Mapping | None = None) -> list[int]:
    """Token length of each prompt as verl's RLHFDataset measures it: the chat template applied to
    the message list with the generation prompt, tokenized (without importing verl: this runs first)."""
    kwargs = {k: v for k, v in dict(chat_kwargs or {}).items() if k not in ("tokenize", "return_dict", "return_tensors")}
    return [
        len(_token_ids(tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True, **kwargs)))
        for p in prompts
    ]


def _token_ids(tokenized: Any) -> list:
    """The id list of `apply_chat_template(tokenize=True)`, whichever shape this transformers returns."""
    if isinstance(tokenized, Mapping) or hasattr(tokenized, "input_ids"):
        tokenized = tokenized["input_ids"]
    if hasattr(tokenized, "tolist"):
        tokenized = tokenized.tolist()
    if tokenized and isinstance(tokenized[0], (list, tuple)):
        tokenized = tokenized[0]
    return list(tokenized)


def check_data_files(
    files: Any,
    key: str,
    data_cfg: Mapping,
    count_lengths: Callable[[list], list[int]] | None = None,
) -> list[str]:
    """Check every local parquet of `files` (see the module docstring); returns warning lines.

    `count_lengths(prompts) -> token lengths` measures prompts (None: lengths are not checked).
    """
    prompt_key = data_cfg.get("prompt_key", "prompt")
    required = [prompt_key, data_cfg.get("reward_fn_key", "data_source"), "reward_model"]
    max_len = data_cfg.get("max_prompt_length")
    mode = overlong_mode(data_cfg)
    warnings = []
    for path in as_file_list(files):
        if is_remote(path):
            continue
        table = read_parquet_checked(path, key, required)
        check_ground_truths(table.column("reward_model").to_pylist(), path, key)
        if count_lengths is not None and max_len is not None:
            lengths = count_lengths(table.column(prompt_key).to_pylist())
            warning = check_prompt_lengths(prompt_length_report(path, lengths, max_len), max_len, key, mode)
            if warning:
                warnings.append(warning)
    return warnings


def local_tokenizer(model_cfg: Mapping):
    """The tokenizer verl will load (tokenizer_path, else the model path) when it is a local
    directory, or a hub id already in the cache; None otherwise (lengths are then not checked)."""
    import os

    source = model_cfg.get("tokenizer_path") or model_cfg.get("path")
    if not source or is_remote(str(source)):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            os.path.expanduser(str(source)), trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
            local_files_only=True,
        )
    except OSError:
        return None


def check_training_inputs(config) -> list[str]:
    """Model source, checkpoint directory and data files of a training config; returns warning lines."""
    model = config.actor_rollout_ref.model
    check_model_source(model.path, "actor_rollout_ref.model.path")
    if model.get("tokenizer_path"):
        check_model_source(model.tokenizer_path, "actor_rollout_ref.model.tokenizer_path")
    ckpt_dir = config.trainer.default_local_dir
    if not is_remote(str(ckpt_dir)):
        check_writable_dir(ckpt_dir, "trainer.default_local_dir")
    tokenizer = local_tokenizer(model)
    chat_kwargs = config.data.get("apply_chat_template_kwargs") or {}
    count = None if tokenizer is None else (lambda prompts: chat_prompt_lengths(tokenizer, prompts, chat_kwargs))
    warnings = check_data_files(config.data.train_files, "data.train_files", config.data, count)
    if config.data.get("val_files"):
        warnings += check_data_files(config.data.val_files, "data.val_files", config.data, count)
    return warnings


__all__ = [
    "ConfigError",
    "PromptLengthReport",
    "check_clip_ratios",
    "check_data_files",
    "check_optim",
    "check_prompt_lengths",
    "check_sampling",
    "check_training_config",
    "check_training_inputs",
    "overlong_mode",
    "prompt_length_report",
    "read_parquet_checked",
]
