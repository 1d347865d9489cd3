"""`scripts/reproduce_mini.sh`: the whole paper on the tiny assets, stage by stage.

Stages (each writes under `output_dir/<stage>/` and a `DONE.json` when it finished, so a rerun
skips it; `redo=[stage]` recomputes that stage and every later one):

1. base         SFT a fresh tiny Qwen2 until it is partly correct (`base_model.py`).
2. data         the task in verl's RL parquet format: train = all problems, eval = a fixed subset.
3. train        verl DAPO on the CPU backend, one `scripts/run_baselines.sh` call per scheme,
                verl's file logger for the curves, the final actor exported as a HF model.
4. evaluate     Avg@k / Pass@k of the base and every RL model (`verl_ext.evaluation`).
5. analysis     Δlog p / entropy / KL of base vs RL on both models' samples (`verl_ext.analysis`).
6. replacement  selective token replacement, criteria calibrated to replace ratios (Alg. 1).
7. extrapolation selective extrapolation at the Δlog p gate over γ (Eq. 7).
8. report       `report.md` with figures, tables and a verdict per claim (`report.py`).

Every stage is seeded. Training rolls out with verl's `vllm` rollout, as on a GPU cluster; vLLM
has no batch-invariant mode on CPU, so a rerun of that stage differs in its sampled responses.
Bit-identical reruns: `train.overrides=[actor_rollout_ref.rollout.name=hf_reproducible,
actor_rollout_ref.rollout.full_determinism=true]` (`verl_ext.cpu.rollout`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from verl_ext.core.atomic_io import atomic_write_bytes
from verl_ext.core.checks import ConfigError, check_flag, exit_on_config_error
from verl_ext.core.paths import config_dir, source_root
from verl_ext.mini import run_name

CONFIGS = config_dir()
STAGES = ("base", "data", "train", "evaluate", "analysis", "replacement", "extrapolation", "report")
SCHEMES = ("none", "lowprob", "ppl", "dominate")

class PipelineError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- config


def resolve_config(cfg: DictConfig) -> DictConfig:
    """Check stage and scheme names (ConfigError naming the value and the choices: exit code 2)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    check_flag(cfg.show_progress, "show_progress")
    for stage in cfg.redo:
        if stage not in STAGES:
            raise ConfigError(f"redo: unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or not all(isinstance(x, int) for x in cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)!r}: give a non-empty list of distinct integers, e.g. [0,1,2]")
    if not cfg.schemes:
        raise ConfigError(f"schemes is empty; choose from {', '.join(SCHEMES)}")
    for scheme in cfg.schemes:
        if scheme not in SCHEMES:
            raise ConfigError(f"schemes: unknown weighting {scheme!r}; valid choices: {', '.join(SCHEMES)}")
    for key in ("analysis", "replacement", "extrapolation"):
        if cfg[key].rl_scheme not in cfg.schemes:
            raise ConfigError(
                f"{key}.rl_scheme={cfg[key].rl_scheme!r} is not trained; trained schemes: {list(cfg.schemes)}"
            )
    return cfg


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Another command's config (configs/<name>.yaml) with overrides, as its CLI would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def listing(values) -> str:
    """A hydra list literal: [a,b,c]."""
    return "[" + ",".join(str(v) for v in values) + "]"


# ----------------------------------------------------------------------------- stage bookkeeping


class Stages:
    """DONE markers: a stage is skipped when its marker exists, unless it (or an earlier stage) is redone."""

    def __init__(self, out: Path, redo: list[str]):
        self.out = out
        first_redo = min((STAGES.index(s) for s in redo), default=len(STAGES))
        self.redo = set(STAGES[first_redo:])

    def marker(self, stage: str) -> Path:
        return self.out / stage / "DONE.json"

    def done(self, stage: str) -> bool:
        return stage not in self.redo and self.marker(stage).exists()

    def finish(self, stage: str, info: dict) -> None:
        atomic_write_bytes(self.marker(stage), json.dumps(info, indent=1, default=str).encode())

    def info(self, stage: str) -> dict:
        return json.loads(self.marker(stage).read_text())


def run_stage(stages: Stages, stage: str, fn, *args) -> dict:
    if stages.done(stage):
        print(f"[mini] {stage}: done earlier, kept ({stages.marker(stage)})", flush=True)
        return stages.info(stage)
    if stages.marker(stage).exists():  # a redo starts clean (a sweep would otherwise resume its old shards)
        shutil.rmtree(stages.out / stage)
    print(f"[mini] {stage}: running", flush=True)
    start = time.monotonic()
    info = fn(*args) or {}
    info["seconds"] = round(time.monotonic() - start, 1)
    stages.finish(stage, info)
    print(f"[mini] {stage}: finished in {info['seconds']:.0f} s", flush=True)
    return info


# ----------------------------------------------------------------------------- stages


def stage_base(cfg: DictConfig, out: Path) -> dict:
    from verl_ext.mini.base_model import train_base_model
    from verl_ext.tiny_assets import arithmetic_problems

    problems = arithmetic_problems(seed=cfg.seed + 1)
    trace = train_base_model(
        out / "base" / "model",
        problems,
        task_split(cfg)[1],
        band=tuple(cfg.base.target_accuracy),
        chunk_steps=cfg.base.chunk_steps,
        max_steps=cfg.base.max_steps,
        eval_samples=cfg.base.eval_samples,
        max_new_tokens=cfg.task.max_new_tokens,
        seed=cfg.seed,
    )
    return {"model": str(out / "base" / "model"), "sft_steps": trace.stopped_at, "accuracy": trace.accuracy[-1]}


def task_split(cfg: DictConfig) -> tuple[list, list]:
    """(all problems, evaluation subset): the subset is the first `eval_problems` after a seeded shuffle."""
    from verl_ext.tiny_assets import arithmetic_problems

    problems = arithmetic_problems(seed=cfg.seed)
    if not 1 <= cfg.task.eval_problems <= len(problems):
        raise PipelineError(f"task.eval_problems={cfg.task.eval_problems} must be in [1, {len(problems)}]")
    return problems, problems[: cfg.task.eval_problems]


def stage_data(cfg: DictConfig, out: Path) -> dict:
    import pandas as pd

    from verl_ext.tiny_assets import dataset_rows

    train, evaluation = task_split(cfg)
    (out / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(dataset_rows("train", train)).to_parquet(out / "data" / "train.parquet", index=False)
    pd.DataFrame(dataset_rows("eval", evaluation)).to_parquet(out / "data" / "eval.parquet", index=False)
    return {"train_problems": len(train), "eval_problems": len(evaluation)}


def training_overrides(cfg: DictConfig, out: Path, scheme: str, seed: int) -> list[str]:
    t = cfg.train
    run_dir = out / "train" / run_name(scheme, seed)
    overrides = [
        f"actor_rollout_ref.model.path={out / 'base' / 'model'}",
        f"data.train_files={out / 'data' / 'train.parquet'}",
        f"data.val_files={out / 'data' / 'eval.parquet'}",
        f"data.val_batch_size={cfg.task.eval_problems}",
        f"data.max_response_length={cfg.task.max_new_tokens}",
        f"data.train_batch_size={t.prompts_per_step}",
        f"data.gen_batch_size={t.prompts_per_step}",
        f"data.seed={seed}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={t.prompts_per_step}",
        f"actor_rollout_ref.actor.optim.lr={t.lr}",
        f"actor_rollout_ref.rollout.n={t.samples_per_prompt}",
        f"actor_rollout_ref.rollout.val_kwargs.n={t.val_samples}",
        f"actor_rollout_ref.rollout.seed={seed}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
        f"trainer.total_training_steps={t.steps}",
        "trainer.total_epochs=100000",
        f"trainer.test_freq={t.test_freq}",
        "trainer.val_before_train=true",
        f"trainer.save_freq={t.steps}",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"trainer.experiment_name=mini-{run_name(scheme, seed)}",
        "trainer.logger=[console,file]" if not wandb_requested() else "trainer.logger=[console,file,wandb]",
    ]
    return overrides + list(t.overrides)


def wandb_requested() -> bool:
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def train_one(cfg: DictConfig, out: Path, scheme: str, seed: int) -> dict:
    """One DAPO run through `scripts/run_baselines.sh` (so each baseline gets the paper's settings)."""
    name = run_name(scheme, seed)
    run_dir = out / "train" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a crashed earlier attempt: start clean (resume_mode=disable)
    run_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "SCHEMES": scheme,
        "PRESET": "tiny-cpu",
        "LOG_DIR": str(run_dir),
        "VERL_FILE_LOGGER_PATH": str(run_dir / "metrics.jsonl"),
        "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", "reproduce-mini"),
    }
    repo = source_root()
    if repo is None:
        raise FileNotFoundError("the train stage runs scripts/run_baselines.sh, which only a checkout of the repository has")
    cmd = ["bash", str(repo / "scripts" / "run_baselines.sh"), *training_overrides(cfg, out, scheme, seed)]
    print(f"[mini] train {name}: {' '.join(cmd[:2])} ... (logs under {run_dir})", flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if not cfg.show_progress else None, check=False)
    if proc.returncode != 0:
        raise PipelineError(f"training {name} failed (exit {proc.returncode}); see the logs under {run_dir}")
    from verl_ext.merge import is_run_dir, merge_checkpoint

    # run_baselines.sh puts each run in its own folder under trainer.default_local_dir
    folders = [d for d in (run_dir / "checkpoints").glob("*") if is_run_dir(d)]
    if len(folders) != 1:
        raise PipelineError(f"training {name} finished but {run_dir / 'checkpoints'} holds {len(folders)} run folders")
    hf_dir = merge_checkpoint(folders[0], cfg.train.steps, quiet=True)
    if not (hf_dir / "config.json").exists() or not any(hf_dir.glob("*.safetensors")):
        raise PipelineError(f"training {name} finished but wrote no HF model at {hf_dir}")
    model_dir = out / "models" / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(hf_dir, model_dir)
    return {"model": str(model_dir), "metrics": str(run_dir / "metrics.jsonl")}


def stage_train(cfg: DictConfig, out: Path) -> dict:
    return {run_name(s, k): train_one(cfg, out, s, k) for k in cfg.seeds for s in cfg.schemes}


def model_paths(cfg: DictConfig, out: Path) -> dict[str, str]:
    """name -> HF model dir: `base` and one per trained scheme and seed (`rl-none-seed0` is plain DAPO)."""
    trained = {f"rl-{run_name(s, k)}": str(out / "models" / run_name(s, k)) for k in cfg.seeds for s in cfg.schemes}
    return {"base": str(out / "base" / "model"), **trained}


def studied_model(cfg: DictConfig, out: Path, scheme: str) -> Path:
    """The RL model the analysis and the sweeps study: `scheme` of the first training seed."""
    return out / "models" / run_name(scheme, cfg.seeds[0])


def stage_evaluate(cfg: DictConfig, out: Path) -> dict:
    from verl_ext.evaluation.command import run as evaluate
    from verl_ext.tiny_assets import DATA_SOURCE

    e = cfg.evaluate
    tables = {}
    for name, path in model_paths(cfg, out).items():
        ecfg = compose(
            "evaluate",
            [
                f"model.path={path}",
                f"data.files=[{out / 'data' / 'eval.parquet'}]",
                f"sampling.n={e.samples}",
                f"sampling.top_p={e.top_p}",
                f"sampling.max_new_tokens={cfg.task.max_new_tokens}",
                f"sampling.seed={cfg.seed}",
                "sampling.batch_size=256",
                f"shard_problems={cfg.task.eval_problems}",  # one shard: the draws of the recorded runs
                "model.backend=hf",
                "model.device=cpu",
                f"metrics.pass_ks={listing(e.pass_ks)}",
                f"output_dir={out / 'evaluate' / name}",
                f"show_progress={cfg.show_progress}",
                "grader.num_workers=1",
            ],
        )
        tables[name] = evaluate(ecfg)["table"][DATA_SOURCE]
    atomic_write_bytes(out / "evaluate" / "table.json", json.dumps(tables, indent=1).encode())
    return {"table": str(out / "evaluate" / "table.json")}


def stage_analysis(cfg: DictConfig, out: Path) -> dict:
    from verl_ext.analysis.logp_diff import run as analyze

    acfg = compose(
        "analyze_logp_diff",
        [
            f"models.base={out / 'base' / 'model'}",
            f"models.rl={studied_model(cfg, out, cfg.analysis.rl_scheme)}",
            f"input.prompts={out / 'data' / 'eval.parquet'}",
            "input.max_prompts=null",
            f"sampling.n={cfg.analysis.samples}",
            f"sampling.max_new_tokens={cfg.task.max_new_tokens}",
            f"sampling.seed={cfg.seed}",
            "sampling.top_p=1.0",
            "models.device=cpu",
            "overwrite=true",
            "ray.enabled=false",
            f"output_dir={out / 'analysis'}",
            f"show_progress={cfg.show_progress}",
        ],
    )
    files = analyze(acfg)
    return {name: str(path) for name, path in files.items()}


def sweep_overrides(cfg: DictConfig, out: Path, section: DictConfig, subdir: str) -> list[str]:
    return [
        f"models.base={out / 'base' / 'model'}",
        f"models.rl={studied_model(cfg, out, section.rl_scheme)}",
        f"data.files=[{out / 'data' / 'eval.parquet'}]",
        f"n_samples={section.samples}",
        f"seeds=[{cfg.seed}]",
        f"pass_ks=[1,{section.samples}]",
        f"decoding.max_new_tokens={cfg.task.max_new_tokens}",
        "models.device=cpu",
        "ray.enabled=false",
        f"output_dir={out / subdir}",
        f"show_progress={cfg.show_progress}",
        "sweep.calibration.max_new_tokens=" + str(cfg.task.max_new_tokens),
    ]


def stage_replacement(cfg: DictConfig, out: Path) -> dict:
    from verl_ext.decoding.sweep import run as sweep

    r = cfg.replacement
    scfg = compose(
        "token_replacement",
        sweep_overrides(cfg, out, r, "replacement")
        + [
            f"sweep.target_ratios={listing(r.target_ratios)}",
            f"sweep.calibrate_criteria={listing(r.criteria)}",
            f"sweep.criteria={listing(r.criteria)}",
            "sweep.thresholds={}",
        ],
    )
    sweep(scfg)
    return {"results": str(out / "replacement" / "results.json")}


def stage_extrapolation(cfg: DictConfig, out: Path) -> dict:
    from verl_ext.decoding.sweep import run as sweep

    x = cfg.extrapolation
    scfg = compose(
        "extrapolation",
        sweep_overrides(cfg, out, x, "extrapolation")
        + [
            "decoding.action=extrapolate",
            f"sweep.gammas={listing(x.gammas)}",
            "sweep.thresholds={delta_logp:" + listing(x.delta_logp_thresholds) + "}",
            "sweep.criteria=[delta_logp]",
            "sweep.target_ratios=[]",
        ],
    )
    sweep(scfg)
    return {"results": str(out / "extrapolation" / "results.json")}


def stage_report(cfg: DictConfig, out: Path) -> dict:
    from verl_ext.mini.report import write_report

    path = write_report(cfg, out)
    return {"report": str(path)}


def run(cfg: DictConfig) -> Path:
    cfg = resolve_config(cfg)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    stages = Stages(out, list(cfg.redo))
    start = time.monotonic()
    for stage in STAGES:
        run_stage(stages, stage, globals()[f"stage_{stage}"], cfg, out)
    report = out / "report.md"
    print(f"[mini] all stages done in {time.monotonic() - start:.0f} s; report: {report}", flush=True)
    return report


@hydra.main(version_base=None, config_path=str(CONFIGS), config_name="reproduce_mini")
def main(cfg: DictConfig) -> None:
    try:
        with exit_on_config_error("mini"):  # a bad setting: exit code 2, as every command
            run(cfg)
    except (PipelineError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"[mini] error: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
