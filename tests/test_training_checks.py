"""Every training setting and input that used to fail a minute later inside Ray (or train on garbage)
fails before Ray starts, in seconds, with the key, the bad value and what is valid."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from verl_ext.core.checks import ConfigError
from verl_ext.core.paths import config_dir
from verl_ext.training_checks import (
    chat_prompt_lengths,
    check_data_files,
    check_prompt_lengths,
    check_training_config,
    check_training_inputs,
    prompt_length_report,
)

REPO = Path(__file__).resolve().parents[1]
TINY = Path(os.environ.get("TINY_ASSETS_DIR") or REPO / ".assets" / "tiny")
R, A = "actor_rollout_ref.rollout", "actor_rollout_ref.actor"
FAIL_WITHIN_S = 15


def compose_training(*overrides: str):
    from recipe.dapo_reweight.main import verl_config_dir

    searchpath = f"hydra.searchpath=[file://{verl_config_dir()}]"
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose("dapo_reweight", overrides=[searchpath, "+preset=qwen2.5-math-7b", *overrides])


@pytest.fixture(scope="module")
def tiny_assets():
    from verl_ext.tiny_assets import ensure_tiny_assets

    ensure_tiny_assets(str(TINY))
    return TINY


BAD_VALUES = [
    (f"{R}.top_p=1.5", f"{R}.top_p=1.5 is invalid; valid: a number in (0, 1]"),
    (f"{R}.top_p=0", f"{R}.top_p=0 is invalid; valid: a number in (0, 1]"),
    (f"{R}.top_p=nan", f"{R}.top_p=nan is invalid; valid: a number in (0, 1]"),
    (f"{R}.val_kwargs.top_p=-0.7", f"{R}.val_kwargs.top_p=-0.7 is invalid; valid: a number in (0, 1]"),
    (f"{R}.top_k=2.5", f"{R}.top_k=2.5 is invalid; valid: an integer >= -1"),
    (f"{R}.val_kwargs.top_k=-5", f"{R}.val_kwargs.top_k=-5 is invalid; valid: an integer >= -1"),
    (f"{R}.temperature=0", f"{R}.temperature=0 is invalid; valid: a number > 0"),
    (f"{R}.temperature=inf", f"{R}.temperature=inf is invalid; valid: a number > 0"),
    (f"{R}.val_kwargs.temperature=-1", f"{R}.val_kwargs.temperature=-1 is invalid; valid: a number >= 0"),
    (f"{A}.optim.lr=0", f"{A}.optim.lr=0 is invalid; valid: a number > 0"),
    (f"{A}.optim.lr=nan", f"{A}.optim.lr=nan is invalid; valid: a number > 0"),
    (f"{A}.optim.lr=-1e-6", f"{A}.optim.lr=-1e-06 is invalid; valid: a number > 0"),
    (f"{A}.clip_ratio_low=1.2", f"{A}.clip_ratio_low=1.2 is invalid; valid: a number in (0, 1), or null"),
    (f"{A}.clip_ratio_low=0", f"{A}.clip_ratio_low=0 is invalid; valid: a number in (0, 1), or null"),
    (f"{A}.clip_ratio_high=nan", f"{A}.clip_ratio_high=nan is invalid; valid: a number > 0, or null"),
    (f"{A}.clip_ratio_high=-0.28", f"{A}.clip_ratio_high=-0.28 is invalid; valid: a number > 0, or null"),
    (f"{A}.clip_ratio_c=0.5", f"{A}.clip_ratio_c=0.5 is invalid; valid: a number > 1"),
    (f"{A}.clip_ratio=nan", f"{A}.clip_ratio=nan is invalid; valid: a number in (0, 1)"),
    ("replay_buffer_poll_s=0", "replay_buffer_poll_s=0 is invalid; valid: a number > 0, or null"),
    ("dry_run=maybe", "dry_run='maybe' is invalid; valid: true, false"),
    (f"{A}.policy_loss.alpha=abc", f"{A}.policy_loss.alpha='abc' is invalid; valid: a number >= 0, or null"),
    (f"{A}.policy_loss.alpha=-0.2", f"{A}.policy_loss.alpha=-0.2 is invalid; valid: a number >= 0, or null"),
    (f"{A}.policy_loss.ppl_clamp=[0.8,x]", f"{A}.policy_loss.ppl_clamp[1]='x' is invalid; valid: a number > 0"),
    (f"{A}.policy_loss.ppl_clamp=[0.8]", f"{A}.policy_loss.ppl_clamp=[0.8] is invalid; valid: [low, high], two numbers > 0"),
    (f"{R}.full_determinism=no", f"{R}.full_determinism='no' is invalid; valid: true, false"),
    ("run.merge_at_end=no", "run.merge_at_end='no' is invalid; valid: true, false"),
    (f"{A}.policy_loss.ppl_iqr_filter=no", f"{A}.policy_loss.ppl_iqr_filter='no' is invalid; valid: true, false"),
    ("+reward.custom_reward_function.reward_kwargs.timeout_s=0",
     "reward.custom_reward_function.reward_kwargs.timeout_s=0 is invalid; valid: a number > 0"),
    ("+reward.custom_reward_function.reward_kwargs.timeout_s=nan",
     "reward.custom_reward_function.reward_kwargs.timeout_s=nan is invalid; valid: a number > 0"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_bad_setting_is_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        check_training_config(compose_training(override))
    assert str(err.value) == message


def test_the_presets_own_settings_pass():
    check_training_config(compose_training())
    check_training_config(compose_training(f"{R}.top_k=50", f"{R}.val_kwargs.temperature=0", f"{A}.clip_ratio_high=null"))
    check_training_config(compose_training("+reward.custom_reward_function.reward_kwargs.timeout_s=2.5"))


def _write(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _row(prompt: str, truth="7"):
    return {
        "prompt": [[{"role": "user", "content": prompt}]],
        "data_source": ["t"],
        "reward_model": [{"style": "rule", "ground_truth": truth}],
    }


DATA = {"prompt_key": "prompt", "reward_fn_key": "data_source", "max_prompt_length": 32,
        "filter_overlong_prompts": True, "truncation": "error"}


def test_empty_or_columnless_or_missing_parquet_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_files: data file '\S+nope.parquet' does not exist"):
        check_data_files(str(tmp_path / "nope.parquet"), "data.train_files", DATA)
    no_truth = _write(tmp_path / "no_truth.parquet", {"prompt": _row("x")["prompt"], "data_source": ["t"]})
    with pytest.raises(ConfigError, match=rf"data.train_files: {no_truth} has no column 'reward_model' \(columns: prompt, data_source\)"):
        check_data_files([no_truth], "data.train_files", DATA)
    questions = _write(tmp_path / "questions.parquet", {"question": ["1+1"], "answer": ["2"]})
    with pytest.raises(ConfigError, match=r"has no column 'prompt', 'data_source', 'reward_model' \(columns: question, answer\)"):
        check_data_files(questions, "data.val_files", DATA)
    empty = _write(tmp_path / "empty.parquet", {k: pa.array([], type=pa.table(v).schema[0].type) for k, v in
                                                 ((k, {k: v}) for k, v in _row("x").items())})
    with pytest.raises(ConfigError, match=rf"data.train_files: {empty} has no rows"):
        check_data_files(empty, "data.train_files", DATA)
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet")
    with pytest.raises(ConfigError, match=rf"data.train_files: {text} is not a readable parquet file"):
        check_data_files(str(text), "data.train_files", DATA)
    blank_truth = _write(tmp_path / "blank.parquet", _row("x", truth=""))
    with pytest.raises(ConfigError, match=rf"{blank_truth} row 0 has no reward_model.ground_truth"):
        check_data_files(blank_truth, "data.train_files", DATA)


def test_prompt_length_rules():
    report = prompt_length_report("f.parquet", [3, 40, 50, 10], 32)
    assert (report.total, report.too_long, report.longest) == (4, 2, 50)
    assert check_prompt_lengths(report, 32, "data.train_files", "drop") == (
        "data.train_files: f.parquet: 2 of 4 prompts are longer than data.max_prompt_length=32 tokens (longest 50): "
        "verl drops them (data.filter_overlong_prompts=true)"
    )
    assert "verl truncates them" in check_prompt_lengths(report, 32, "k", "truncate")
    with pytest.raises(ConfigError, match="verl fails on the first one; set data.filter_overlong_prompts=true"):
        check_prompt_lengths(report, 32, "k", "error")
    everything = prompt_length_report("f.parquet", [40, 50], 32)
    with pytest.raises(ConfigError, match=r"2 of 2 prompts are longer .* verl would drop them all; raise data.max_prompt_length"):
        check_prompt_lengths(everything, 32, "k", "drop")
    assert check_prompt_lengths(prompt_length_report("f", [1, 2], 32), 32, "k", "error") is None


def test_prompt_lengths_are_measured_with_the_chat_template(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets / "model"))
    messages = [{"role": "user", "content": "Compute 9-2."}]
    expected = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    short, long = chat_prompt_lengths(tokenizer, [messages, [{"role": "user", "content": "Compute 9-2. " * 20}]])
    assert short == expected and long > 3 * short
    path = _write(tmp_path / "mixed.parquet", {k: _row("Compute 9-2.")[k] + _row("Compute 9-2. " * 20)[k] for k in DATA_KEYS})
    count = lambda prompts: chat_prompt_lengths(tokenizer, prompts)
    (warning,) = check_data_files(path, "data.train_files", {**DATA, "max_prompt_length": short}, count)
    assert warning.endswith(f"1 of 2 prompts are longer than data.max_prompt_length={short} tokens (longest {long}): "
                            "verl drops them (data.filter_overlong_prompts=true)")


DATA_KEYS = ("prompt", "data_source", "reward_model")


def test_unwritable_checkpoint_dir_is_named(tiny_assets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = compose_training(
        f"actor_rollout_ref.model.path={tiny_assets / 'model'}", f"trainer.default_local_dir={blocker / 'ckpt'}",
        f"data.train_files={tiny_assets / 'data' / 'train.parquet'}", f"data.val_files={tiny_assets / 'data' / 'val.parquet'}",
    )
    with pytest.raises(ConfigError, match=rf"trainer.default_local_dir='{blocker}/ckpt': {blocker} is a file, not a directory"):
        check_training_inputs(config)
    if os.access("/sys", os.W_OK) and subprocess.run(["touch", "/sys/.probe"], check=False).returncode == 0:
        return
    config.trainer.default_local_dir = "/sys/checkpoints/run"
    with pytest.raises(ConfigError, match="trainer.default_local_dir='/sys/checkpoints/run': /sys is not writable"):
        check_training_inputs(config)


def _main(*overrides: str, env: dict | None = None, cwd: Path = REPO) -> tuple[int, str, float]:
    """The training entry point as the script runs it; (exit code, stderr, CPU seconds it used).

    CPU seconds, not wall-clock: on a shared 2-core test machine the wall-clock time of the same work
    varies threefold with the other jobs (the failure message also reports the wall-clock time)."""
    full_env = {**os.environ, "TINY_ASSETS_DIR": str(TINY), "PYTHONPATH": str(REPO), **(env or {})}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.dapo_reweight.main", "+preset=tiny-cpu", *overrides],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120, check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return proc.returncode, proc.stderr + f"\n(wall {time.monotonic() - start:.1f} s)", cpu


@pytest.mark.parametrize(
    "overrides, env, message",
    [
        ([f"{R}.top_p=1.5"], {}, f"[dapo_reweight] error: {R}.top_p=1.5 is invalid; valid: a number in (0, 1]"),
        ([f"{A}.optim.lr=nan"], {}, f"[dapo_reweight] error: {A}.optim.lr=nan is invalid; valid: a number > 0"),
        ([f"{A}.clip_ratio_c=0.5"], {}, f"{A}.clip_ratio_c=0.5 is invalid; valid: a number > 1"),
        (["data.max_prompt_length=5"], {}, "48 of 48 prompts are longer than data.max_prompt_length=5 tokens"),
        (["actor_rollout_ref.model.path=no-such-org/no-such-model"], {"HF_HUB_OFFLINE": "1"},
         "actor_rollout_ref.model.path='no-such-org/no-such-model': not a local directory, and the hub is offline"),
        (["trainer.default_local_dir=/sys/ckpt"], {}, "trainer.default_local_dir='/sys/ckpt': /sys is not writable"),
    ],
)
def test_the_command_fails_in_seconds_naming_the_setting(tiny_assets, overrides, env, message):
    if "/sys" in overrides[0] and os.access("/sys", os.W_OK) and subprocess.run(["touch", "/sys/.probe"], check=False).returncode == 0:
        pytest.skip("/sys is writable here")
    code, stderr, seconds = _main(*overrides, env=env)
    assert code == 2, stderr[-2000:]
    assert message in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert seconds < FAIL_WITHIN_S, f"took {seconds:.1f} CPU s; {stderr[-30:]}"


def test_the_command_refuses_an_empty_training_parquet(tiny_assets, tmp_path):
    empty = tmp_path / "train.parquet"
    pq.write_table(pq.read_table(tiny_assets / "data" / "train.parquet").slice(0, 0), empty)
    code, stderr, seconds = _main(f"data.train_files={empty}")
    assert code == 2 and f"[dapo_reweight] error: data.train_files: {empty} has no rows" in stderr, stderr[-2000:]
    assert seconds < FAIL_WITHIN_S


def test_a_failed_launch_leaves_no_hydra_outputs_folder(tiny_assets, tmp_path):
    code, stderr, _ = _main(f"{R}.top_p=1.5", cwd=tmp_path)
    assert code == 2, stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/.hydra, no main.log
