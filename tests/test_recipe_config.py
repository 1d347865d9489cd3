"""The recipe config: every preset x every scheme composes and validates (what DRY_RUN=1 does)."""

import functools
import os
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recipe.dapo_reweight.main import available_presets, prepare_config
from verl_ext.core.paths import config_dir

REPO = Path(__file__).resolve().parents[1]
SEARCHPATH = "hydra.searchpath=[pkg://verl.trainer.config]"
SCHEMES = ["lowprob", "ppl", "dominate", "none"]


@functools.cache
def composed(*overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return prepare_config(compose("dapo_reweight", overrides=[SEARCHPATH, *overrides]))


def test_presets_exist():
    assert {"qwen2.5-math-7b", "qwen3-8b-base", "tiny-cpu"} <= set(available_presets())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("preset", ["qwen2.5-math-7b", "qwen3-8b-base", "tiny-cpu"])
def test_every_preset_and_scheme_composes(preset, scheme):
    cfg = composed(f"+preset={preset}", f"actor_rollout_ref.actor.policy_loss.weighting={scheme}")
    actor = cfg.actor_rollout_ref.actor
    assert actor.policy_loss.loss_mode == "dapo_reweight" and actor.policy_loss.weighting == scheme
    assert cfg.trainer.v1.trainer_mode == "dapo_reweight"
    # DAPO settings that every preset keeps
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert actor.loss_agg_mode == "token-mean" and not actor.use_kl_loss and actor.entropy_coeff == 0
    assert cfg.algorithm.adv_estimator == "grpo" and not cfg.algorithm.use_kl_in_reward
    assert cfg.algorithm.filter_groups.enable and cfg.algorithm.filter_groups.metric == "acc"
    assert cfg.reward.reward_manager.name == "dapo" and cfg.reward.reward_kwargs.overlong_buffer_cfg.enable
    assert cfg.reward.custom_reward_function.path.endswith("verl_ext/reward.py")
    assert cfg.actor_rollout_ref.rollout.val_kwargs.top_p == 0.7


@pytest.mark.parametrize(
    "preset, response_len, lowprob_alpha", [("qwen2.5-math-7b", 8192, 0.2), ("qwen3-8b-base", 20480, 0.1)]
)
def test_paper_presets_have_the_papers_numbers(preset, response_len, lowprob_alpha):
    cfg = composed(f"+preset={preset}")
    actor = cfg.actor_rollout_ref.actor
    assert cfg.data.train_batch_size == 512 and cfg.actor_rollout_ref.rollout.n == 16
    assert cfg.data.gen_batch_size == 3 * 512 and cfg.algorithm.filter_groups.max_num_gen_batches == 10
    assert actor.ppo_mini_batch_size == 32
    assert actor.optim.lr == 1e-6 and actor.optim.lr_warmup_steps == 10 and actor.optim.weight_decay == 0.1
    assert actor.grad_clip == 1.0
    assert cfg.data.max_prompt_length == 2048 and cfg.data.max_response_length == response_len
    assert cfg.reward.reward_kwargs.overlong_buffer_cfg.len == 4096
    assert cfg.reward.reward_kwargs.overlong_buffer_cfg.penalty_factor == 1.0
    assert cfg.reward.reward_kwargs.max_resp_len == response_len
    assert (cfg.actor_rollout_ref.rollout.temperature, cfg.actor_rollout_ref.rollout.top_p) == (1.0, 1.0)
    assert actor.policy_loss.alpha == lowprob_alpha
    assert composed(f"+preset={preset}", "actor_rollout_ref.actor.policy_loss.weighting=ppl")[
        "actor_rollout_ref"
    ].actor.policy_loss.alpha == 0.01
    if preset == "qwen2.5-math-7b":
        assert cfg.actor_rollout_ref.model.override_config.max_position_embeddings == 32768


@pytest.mark.parametrize(
    "override, message",
    [
        ("actor_rollout_ref.actor.policy_loss.weighting=lowprobb", "valid choices: lowprob, ppl, dominate, none"),
        ("actor_rollout_ref.actor.policy_loss.alpha=-0.5", "got -0.5"),
        ("actor_rollout_ref.actor.policy_loss.ppl_clamp=[1.3,0.7]", "low=1.3, high=0.7"),
        ("trainer.v1.trainer_mode=sync", None),
        ("replay_buffer_poll_s=0", r"replay_buffer_poll_s=0 is invalid; valid: a number > 0, or null"),
        ("replay_buffer_poll_s=soon", r"replay_buffer_poll_s='soon' is invalid"),
    ],
)
def test_bad_values_fail_before_ray(override, message):
    extra = ["actor_rollout_ref.actor.policy_loss.weighting=ppl"] if message is None else []
    with pytest.raises(Exception, match=message or "weighting=ppl needs the group-aware trainer"):
        composed("+preset=qwen2.5-math-7b", *extra, override)


def test_dry_run_script_names_bad_preset_and_scheme():
    bad_preset = subprocess.run(
        ["bash", "scripts/run_dapo_reweight.sh"], cwd=REPO, env={"PATH": "/usr/bin:/bin", "PRESET": "nope"},
        capture_output=True, text=True, check=False,
    )
    assert bad_preset.returncode == 2
    assert "PRESET=nope does not exist; valid presets:" in bad_preset.stderr and "qwen3-8b-base" in bad_preset.stderr
    bad_scheme = subprocess.run(
        ["bash", "scripts/run_dapo_reweight.sh"], cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PRESET": "qwen3-8b-base", "WEIGHTING": "foo", "PYTHON": "python3"},
        capture_output=True, text=True, check=False,
    )
    assert bad_scheme.returncode == 2
    assert bad_scheme.stderr.strip() == "[run_dapo_reweight] error: WEIGHTING='foo' is invalid; valid: lowprob, ppl, dominate, none"


def test_missing_model_or_data_and_rows_without_ground_truth_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from verl_ext.core.checks import ConfigError, check_model_source
    from verl_ext.training_checks import check_data_files

    with pytest.raises(ConfigError, match=r"actor_rollout_ref.model.path='/no/such/model': no such model"):
        check_model_source("/no/such/model", "actor_rollout_ref.model.path")
    missing = tmp_path / "train.parquet"
    with pytest.raises(ConfigError, match=f"data.train_files: data file '{missing}' does not exist"):
        check_data_files([str(missing)], "data.train_files", {})
    rows = [{"ground_truth": "12", "style": "rule"}, {"ground_truth": "7", "style": "rule"}, {"ground_truth": None, "style": "rule"}]
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "data_source": ["d"] * 3, "reward_model": rows}), missing)
    with pytest.raises(ConfigError, match=f"data.train_files: {missing} row 2 has no reward_model.ground_truth"):
        check_data_files(str(missing), "data.train_files", {})


def test_baselines_script_gives_dominate_its_paper_settings():
    out = subprocess.run(
        ["bash", "scripts/run_baselines.sh"], cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "DRY_RUN": "1", "SCHEMES": "dominate", "PRESET": "qwen2.5-math-7b", "LOG_DIR": "/tmp/bl"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run: config composed and validated" in out.stdout
    config = out.stdout[out.stdout.index("actor_rollout_ref:"):]
    assert "clip_ratio_high: 0.24" in config and "weighting: dominate" in config
    assert re.search(r"experiment_name: qwen2.5-math-7b-dominate-a0.1-topp1.0", config)
    bad = subprocess.run(
        ["bash", "scripts/run_baselines.sh"], cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "SCHEMES": "none lowprb"},
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "[run_baselines] error: SCHEMES='lowprb' is invalid; valid: none, lowprob, ppl, dominate"


def test_the_printed_evaluation_command_fits_the_preset():
    """A tiny run is evaluated on the tiny arithmetic set (its own data); a real preset on AIME/AMC,
    which prepare_data.sh writes first."""
    from omegaconf import OmegaConf

    from recipe.dapo_reweight.main import evaluate_command

    tiny = OmegaConf.create({"preset_name": "tiny-cpu", "trainer": {"default_local_dir": "/runs/a"}})
    assert evaluate_command(tiny) == "bash scripts/evaluate.sh tiny=true model.path=/runs/a"
    real = OmegaConf.create({"preset_name": "qwen2.5-math-7b", "trainer": {"default_local_dir": "/runs/b"}})
    assert evaluate_command(real).endswith("; bash scripts/evaluate.sh model.path=/runs/b")
    assert evaluate_command(real).startswith("bash scripts/prepare_data.sh raw_dir=")
