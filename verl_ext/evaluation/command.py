"""The evaluation command (hydra; config `configs/evaluate.yaml`, wrapper `scripts/evaluate.sh`).

    # (a) grade an existing .jsonl / .parquet of generations (one row per response)
    bash scripts/evaluate.sh generations=outputs/gens.jsonl metrics.pass_ks=[1,4]
    # (b) generate with a model, then grade (paper defaults: 32 samples, temperature 1.0, top-p 0.7)
    bash scripts/evaluate.sh model.path=/models/Qwen2.5-Math-7B data.files=[data/prepared/aime24.parquet]

`mode=auto` grades when `generations` is set and generates otherwise. Generation runs on the shared
job runner (`verl_ext.evaluation.generate`: shards of problems, in-process or on Ray, resumable).
Outputs under `output_dir`: generations/shard-*.parquet and generations.jsonl (mode generate),
per_problem.jsonl, results.json, results.md;
to wandb as well when WANDB_MODE or WANDB_API_KEY is set (`verl_ext.wandb_logging`: the training's
project and group by default).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from verl_ext.core.checks import (
    ConfigError,
    check_choice,
    check_file,
    check_flag,
    check_list,
    check_model_source,
    check_number,
    check_sampling,
    check_writable_dir,
    exit_on_config_error,
    read_jsonl,
)
from verl_ext.core.paths import config_dir
from verl_ext.evaluation.report import (
    aggregate,
    grade_records,
    group_by_problem,
    log_to_wandb,
    markdown_table,
    write_jsonl,
    write_results,
)
from verl_ext.jobs import check_ray
from verl_ext.wandb_logging import start_run, wandb_enabled

MODES = ("auto", "grade", "generate")
REQUIRED_COLUMNS = ("prompt_id", "response", "ground_truth", "data_source")


class EvaluationError(ConfigError):
    pass


def resolve_mode(cfg: DictConfig) -> str:
    if cfg.mode not in MODES:
        raise EvaluationError(f"mode={cfg.mode!r} is invalid; valid choices: {', '.join(MODES)}")
    if cfg.mode == "auto":
        return "grade" if cfg.generations else "generate"
    if cfg.mode == "grade" and not cfg.generations:
        raise EvaluationError("mode=grade needs generations=<file of generations (.jsonl or .parquet)>")
    return cfg.mode


def _read_table(path: Path) -> list[dict]:
    from verl_ext.data_prep import read_records

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix not in (".jsonl", ".parquet", ".json"):
        raise EvaluationError(f"{path}: unsupported file type {path.suffix!r}; valid: .jsonl, .parquet, .json")
    return read_records(path)


def _empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return len(value) == 0 or all(_empty(v) for v in value)
    return False


def read_generations(path: str | Path, columns: dict) -> list[dict]:
    """Records with the canonical keys (`REQUIRED_COLUMNS`, optional `response_length`,
    `accepted_answers`) from a file whose column names are given by `columns`.

    A row without a ground truth, a prompt id or a data source is refused, named by its line
    (JSONL, counted from 1) or row (parquet / JSON, counted from 1); a response may be empty."""
    path = Path(path)
    if path.suffix == ".jsonl":
        numbered = read_jsonl(path, "generations")
        where = [f"line {lineno}" for lineno, _ in numbered]
        rows = [row for _, row in numbered]
    else:
        rows = _read_table(path)
        where = [f"row {i + 1}" for i in range(len(rows))]
    if not rows:
        raise EvaluationError(f"generations={str(path)!r}: the file has no rows")
    missing = [f"{key} (column {columns[key]!r})" for key in REQUIRED_COLUMNS if columns[key] not in rows[0]]
    if missing:
        raise EvaluationError(
            f"{path}: missing {', '.join(missing)}; the file has columns {sorted(rows[0])}; "
            "map yours with columns.<key>=<your column name>"
        )
    records = []
    for i, row in enumerate(rows):
        record = {key: row.get(columns[key]) for key in (*REQUIRED_COLUMNS, "response_length", "accepted_answers")}
        for key in REQUIRED_COLUMNS:
            if record[key] is None or (key != "response" and _empty(record[key])):
                raise EvaluationError(f"generations={str(path)!r}: {where[i]}: {key} (column {columns[key]!r}) is empty")
        records.append(record)
    return records


def load_problems(files: list[str], max_problems: int | None) -> list[dict]:
    """Problems from verl parquet files (`verl_ext.data_prep` output): messages, ids, ground truth."""
    if not files:
        raise EvaluationError("data.files is empty: give verl parquet files (bash scripts/prepare_data.sh writes them)")
    problems = []
    for file in files:
        path = Path(file)
        if not path.exists():
            raise FileNotFoundError(f"data.files: {path} does not exist (bash scripts/prepare_data.sh writes them)")
        rows = _read_table(path)
        needed = ("prompt", "data_source", "reward_model")
        missing = [c for c in needed if rows and c not in rows[0]]
        if missing:
            raise EvaluationError(f"{path}: not a verl RL parquet, missing columns {missing}; it has {sorted(rows[0])}")
        if not rows:
            raise EvaluationError(f"data.files: {path} has no rows")
        for i, row in enumerate(rows[:max_problems] if max_problems else rows):
            extra = row.get("extra_info") or {}
            truth = (row.get("reward_model") or {}).get("ground_truth")
            if _empty(truth):
                raise EvaluationError(
                    f"data.files: {path} row {i + 1} (counted from 1): reward_model.ground_truth is empty; "
                    "every problem needs an answer to grade against (bash scripts/prepare_data.sh skips such rows)"
                )
            problems.append({
                "messages": [dict(m) for m in row["prompt"]],
                "data_source": row["data_source"],
                "prompt_id": f"{path.stem}:{extra.get('index', i)}",
                "ground_truth": row["reward_model"]["ground_truth"],
                "accepted_answers": list(extra.get("accepted_answers") or []),
            })
    return problems


def check_ks(cfg: DictConfig, n: int) -> None:
    for k in [*(cfg.metrics.pass_ks or []), *([cfg.metrics.avg_k] if cfg.metrics.avg_k else [])]:
        if not isinstance(k, int) or k < 1 or k > n:
            raise EvaluationError(
                f"metrics k={k!r} is invalid with sampling.n={n}: each of metrics.pass_ks and metrics.avg_k "
                f"must be an integer in [1, {n}]"
            )


def apply_tiny_defaults(cfg: DictConfig) -> None:
    """`tiny=true` (what `scripts/evaluate.sh` runs with no argument): the tiny CPU model where
    model.path is unset, and its arithmetic validation set where data.files is the config's default
    (`verl_ext.tiny_assets`, built from code in seconds); files the user gives are evaluated."""
    if not check_flag(cfg.tiny, "tiny") or cfg.generations:
        return
    from verl_ext.tiny_assets import ensure_tiny_assets

    assets = ensure_tiny_assets()
    if not cfg.model.path:
        cfg.model.path = str(assets.model_dir)
        cfg.model.tokenizer = cfg.model.tokenizer or str(assets.tokenizer_dir)
    default_files = OmegaConf.load(config_dir() / "evaluate.yaml").data.files
    if list(cfg.data.files or []) == list(default_files):
        cfg.data.files = [str(assets.val_parquet)]


DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def validate(cfg: DictConfig) -> str:
    """Every setting checked before anything is loaded (one-line ConfigError naming key, value, valid
    choices); returns the mode."""
    from verl_ext.generation import BACKENDS

    mode = resolve_mode(cfg)
    wandb_enabled(cfg.wandb.enable)  # a bad setting fails now, not after generating and grading
    check_number(cfg.grader.timeout_s, "grader.timeout_s", low=0, low_open=True)
    check_number(cfg.grader.num_workers, "grader.num_workers", low=1, integer=True)
    check_writable_dir(cfg.output_dir, "output_dir")
    check_list(cfg.metrics.pass_ks or [], "metrics.pass_ks", lambda k, key: check_number(k, key, low=1, integer=True),
               nonempty=False)
    check_number(cfg.metrics.avg_k, "metrics.avg_k", low=1, integer=True, allow_none=True)
    if mode == "grade":
        check_file(cfg.generations, "generations", suffixes=DATA_SUFFIXES)
        return mode
    check_sampling(cfg.sampling, "sampling", keys=("n", "temperature", "top_p", "top_k", "max_new_tokens",
                                                   "batch_size", "seed"))
    check_ks(cfg, cfg.sampling.n)
    check_choice(cfg.model.backend, "model.backend", BACKENDS)
    check_model_source(cfg.model.path, "model.path")
    if cfg.model.tokenizer:
        check_model_source(cfg.model.tokenizer, "model.tokenizer")
    try:
        check_list(cfg.data.files, "data.files", lambda f, key: check_file(f, key, suffixes=DATA_SUFFIXES))
    except ConfigError as err:
        raise ConfigError(f"{err} (bash scripts/prepare_data.sh raw_dir=<folder of the AIME/AMC jsonl> writes "
                          "them; tiny=true: the tiny arithmetic set)") from None
    check_number(cfg.data.max_problems, "data.max_problems", low=1, integer=True, allow_none=True)
    check_number(cfg.shard_problems, "shard_problems", low=1, integer=True)
    for key in ("overwrite", "show_progress", "model.use_chat_template"):
        check_flag(OmegaConf.select(cfg, key), key)
    check_ray(cfg.ray)
    return mode


def resume_settings(cfg: DictConfig, backend: str) -> dict:
    """What decides a generation shard's contents (`jobs.check_resume`): model, data, sampling, sharding."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {"model": {**plain["model"], "backend": backend}, "data": plain["data"], "sampling": plain["sampling"],
            "shard_problems": plain["shard_problems"]}


def generate_records(cfg: DictConfig) -> list[dict]:
    """Sample `sampling.n` responses per problem of `data.files` with `model.path`: generation records,
    by shards of `shard_problems` problems under `<output_dir>/generations/` (missing shards only)."""
    from verl_ext.core.progress import size_line
    from verl_ext.evaluation.generate import EvalSpec, generate_all
    from verl_ext.generation import resolve_backend
    from verl_ext.jobs import check_resume

    if not cfg.model.path:
        raise EvaluationError("model.path is not set (or pass generations=<file> to grade existing generations)")
    check_ks(cfg, cfg.sampling.n)
    problems = load_problems(list(cfg.data.files), cfg.data.max_problems)
    backend = resolve_backend(cfg.model.backend)
    output_dir = Path(cfg.output_dir)
    check_resume(output_dir, resume_settings(cfg, backend), ("generations",), overwrite=cfg.overwrite,
                 redo_hint="overwrite=true to delete them")
    print(f"[evaluate] size: {size_line(len(problems), cfg.sampling.n, cfg.sampling.max_new_tokens)} "
          f"(backend {backend}); the time left is printed after the first batch", flush=True)
    print(f"[evaluate] generations go to {output_dir / 'generations'} shard by shard; an interrupted run "
          f"resumes with output_dir={output_dir}", flush=True)
    spec = EvalSpec(
        model=str(cfg.model.path), tokenizer=str(cfg.model.tokenizer or cfg.model.path), backend=backend,
        device=cfg.model.device, dtype=cfg.model.dtype, use_chat_template=cfg.model.use_chat_template,
        sampling={k: cfg.sampling[k] for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
                                                "batch_size")},
        show_progress=cfg.show_progress,
    )
    records, generated, shards = generate_all(spec, problems, cfg.shard_problems, output_dir / "generations",
                                              cfg.ray, cfg.show_progress)
    print(f"[evaluate] {shards} shard(s): {generated} generated now, {shards - generated} reused", flush=True)
    return records


def run(cfg: DictConfig) -> dict:
    """Generate (mode generate) or read (mode grade) generations, grade, aggregate, write; returns the table."""
    from verl_ext.merge import resolve_config_paths
    from verl_ext.reward import configure_grader

    apply_tiny_defaults(cfg)
    resolve_config_paths(cfg, ("model.path", "model.tokenizer"))  # a training run's folder: its merged model
    mode = validate(cfg)
    output_dir = Path(cfg.output_dir)
    if mode == "generate":
        records = generate_records(cfg)
        write_jsonl(output_dir / "generations.jsonl", records)
    else:
        records = read_generations(cfg.generations, dict(cfg.columns))
    length_unit = "tokens" if all(r.get("response_length") is not None for r in records) else "chars"
    configure_grader(cfg.grader.num_workers)
    graded = grade_records(records, cfg.grader.timeout_s, cfg.show_progress)
    problems = group_by_problem(records, graded)
    table = aggregate(problems, list(cfg.metrics.pass_ks or []), cfg.metrics.avg_k)
    settings = OmegaConf.to_container(cfg, resolve=True)
    paths = write_results(output_dir, problems, table, length_unit, settings)
    print(markdown_table(table, length_unit), end="")
    print(f"[evaluate] results: {paths['markdown']}, {paths['json']}, {paths['per_problem']}")
    run_ = start_run(cfg.wandb, default_name=f"evaluate-{output_dir.name}", config=settings, out_dir=output_dir,
                     job_type="eval")
    if run_ is not None:
        log_to_wandb(run_, table)
    return {"table": table, "paths": paths, "problems": problems, "mode": mode}


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_config_error("evaluate", (ConfigError, FileNotFoundError, ValueError)):
        run(cfg)
