"""Offline token-level analysis of an RLVR model π_RL against its base model π_B (issue #5).

    python -m verl_ext.analysis.logp_diff \
        models.base=Qwen/Qwen2.5-Math-7B models.rl=/ckpt/dapo-7b output_dir=outputs/dapo7b

(or `bash scripts/analyze_logp_diff.sh ...`). With no overrides it runs in seconds on CPU on the
tiny assets (`verl_ext.tiny_assets`), with a labelled stand-in π_RL (`tiny_assets.perturbed_model`).

Pipeline, every step resumable (each output is written to a temporary file and renamed):

1. Responses: either sampled here from each generator (`sampling.generators`, `verl_ext.generation`),
   `sharding.prompts_per_shard` prompts per shard -> `generations/<generator>/shard-XXXXX.parquet`;
   or read from files (`input.source=files`): parquet with `prompt_ids`/`response_ids` token-id
   columns, or verl's `trainer.rollout_data_dir` / `validation_data_dir` JSONL dumps (text only,
   re-tokenised: verl decodes with skip_special_tokens, so chat-template and EOS tokens are lost).
2. Scoring: one teacher-forced pass of each model per shard (`token_metrics.PairScorer`), one row
   per response token -> `tokens/shard-XXXXX.parquet`. An interrupted run recomputes only
   missing shards; `manifest.json` refuses to mix results of different configurations.
3. Report (`report`, `plots`): `histograms.png`, `prob_by_delta_bin.png` (+ `.csv`), top tokens by
   Δlog p (`top_tokens_{up,down}.{csv,md}`), `summary.md` / `summary.json` with tail masses;
   optionally logged to wandb (when WANDB_MODE or WANDB_API_KEY is set).

Scale-out (`verl_ext.jobs`): with `ray.enabled` (auto: when `ray.address` or RAY_ADDRESS is set or more
than one GPU is visible) shards go to Ray actors, one per GPU, each holding both models; the driver
writes and merges. Without Ray everything runs in this process (the CPU default).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from verl_ext.analysis.token_metrics import METRICS
from verl_ext.core.atomic_io import atomic_write_parquet
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
    invalid,
    read_jsonl,
)
from verl_ext.core.paths import config_dir, figure_name
from verl_ext.core.progress import size_line
from verl_ext.jobs import WorkerPool, check_ray, check_resume, shard_name, shard_seed
from verl_ext.wandb_logging import start_run, wandb_enabled

GENERATION_COLUMNS = ("generator", "prompt_index", "sample_index", "response_id", "prompt_ids", "response_ids")
TOKEN_SCHEMA = pa.schema(
    [
        ("response_id", pa.string()),
        ("generator", pa.string()),
        ("prompt_index", pa.int32()),
        ("sample_index", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
    ]
    + [(m, pa.float32()) for m in METRICS]
)
SOURCES = ("sample", "files")
MANIFEST_VERSION = 1


# ----------------------------------------------------------------------------- records and files


@dataclass
class ResponseRecord:
    """One response to analyse: prompt and response token ids and which model generated it."""

    response_id: str
    generator: str
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str = ""
    finish_reason: str = ""


@dataclass
class ShardTask:
    """A unit of work: prompts to sample (phase 1) or responses to score (phase 2)."""

    index: int
    prompts: list[tuple[int, list[int]]] = field(default_factory=list)  # (prompt_index, ids)
    records: list[ResponseRecord] = field(default_factory=list)


@dataclass
class SampleTask:
    """Phase 1 on one shard: responses from `generator` with sampling seed `seed`."""

    generator: str
    shard: ShardTask
    seed: int


def records_to_table(records: list[ResponseRecord]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in records])


def records_from_table(table: pa.Table) -> list[ResponseRecord]:
    names = set(ResponseRecord.__dataclass_fields__)
    return [ResponseRecord(**{k: v for k, v in row.items() if k in names}) for row in table.to_pylist()]


def read_generation_parquet(path: str | Path, generator: str | None) -> list[ResponseRecord]:
    """Responses from a parquet with list-of-int columns `prompt_ids` and `response_ids`.

    Optional columns: `generator` (used when `generator` is None), `prompt_index`,
    `sample_index`, `response_id`, `response_text`, `finish_reason`. Files this command writes
    under `generations/` have exactly this schema.
    """
    table = pq.read_table(path)
    missing = [c for c in ("prompt_ids", "response_ids") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; found {table.column_names}; expected token-id lists prompt_ids and response_ids"
        )
    if generator is None and "generator" not in table.column_names:
        raise ValueError(
            f"{path}: no `generator` column; say which model generated it ({{path: ..., generator: base|rl}})"
        )
    rows = table.to_pylist()
    out = []
    for i, row in enumerate(rows):
        gen = generator if generator is not None else str(row["generator"])
        out.append(
            ResponseRecord(
                response_id=str(row.get("response_id") or f"{gen}-{Path(path).stem}-{i}"),
                generator=gen,
                prompt_index=int(row["prompt_index"]) if row.get("prompt_index") is not None else i,
                sample_index=int(row["sample_index"]) if row.get("sample_index") is not None else 0,
                prompt_ids=[int(t) for t in row["prompt_ids"]],
                response_ids=[int(t) for t in row["response_ids"]],
                response_text=str(row.get("response_text") or ""),
                finish_reason=str(row.get("finish_reason") or ""),
            )
        )
    return out


def verl_dump_files(path: str | Path, steps: list[int] | None = None) -> list[Path]:
    """verl's dump files: `path` itself if a .jsonl file, else `<step>.jsonl` in the folder (sorted by step)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such verl dump file or folder")
    files = sorted((p for p in path.glob("*.jsonl") if p.stem.isdigit()), key=lambda p: int(p.stem))
    if steps is not None:
        files = [p for p in files if int(p.stem) in set(steps)]
    if not files:
        raise FileNotFoundError(f"{path}: no <step>.jsonl files{' for steps ' + str(steps) if steps else ''}")
    return files


def read_verl_dump(path: str | Path, generator: str, tokenizer, steps: list[int] | None = None) -> list[ResponseRecord]:
    """Responses from verl 0.9.1 `rollout_data_dir` / `validation_data_dir` JSONL dumps.

    verl writes one `<step>.jsonl` per step, a line per sample with `input` (the decoded prompt)
    and `output` (the decoded response), both decoded with skip_special_tokens=True; both are
    re-tokenised here (without special tokens). Lines with the same `input` within a file share a
    prompt_index; sample_index counts them.
    """
    out = []
    for f in verl_dump_files(path, steps):
        prompt_of: dict[str, int] = {}
        seen: dict[int, int] = {}
        with open(f) as fh:
            for line_no, line in enumerate(fh):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "input" not in row or "output" not in row:
                    raise ValueError(
                        f"{f}:{line_no + 1}: not a verl generation dump line (needs `input` and `output`, got {sorted(row)})"
                    )
                p = prompt_of.setdefault(row["input"], len(prompt_of))
                s = seen.get(p, 0)
                seen[p] = s + 1
                prompt_ids = list(tokenizer(row["input"], add_special_tokens=False)["input_ids"])
                response_ids = list(tokenizer(row["output"], add_special_tokens=False)["input_ids"])
                if not prompt_ids or not response_ids:
                    continue
                out.append(
                    ResponseRecord(
                        response_id=f"{generator}-step{f.stem}-{line_no}",
                        generator=generator,
                        prompt_index=p,
                        sample_index=s,
                        prompt_ids=prompt_ids,
                        response_ids=response_ids,
                        response_text=row["output"],
                    )
                )
    return out


def read_prompt_rows(path: str | Path, key: str) -> list[Any]:
    """The `key` field of every row of a parquet or JSONL file (chat messages or a string)."""
    path = Path(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if key not in table.column_names:
            raise ValueError(f"{path}: no column {key!r}; columns are {table.column_names} (set input.prompt_key)")
        return table.column(key).to_pylist()
    if path.suffix == ".jsonl":
        try:
            rows = read_jsonl(path, "input.prompts", required=(key,))
        except ConfigError as err:
            raise ConfigError(f"{err} (set input.prompt_key)" if "field" in str(err) else str(err)) from None
        return [r[key] for _, r in rows]
    raise ValueError(f"{path}: prompts must be a .parquet or .jsonl file, got suffix {path.suffix!r}")


def encode_prompt(tokenizer, prompt: Any, use_chat_template: bool, suffix: str | None) -> list[int]:
    """Token ids of a prompt: chat messages as given, or a string problem with `suffix` appended."""
    from verl_ext.core.prompts import PROMPT_SUFFIX, encode_messages, encode_problem

    if isinstance(prompt, str):
        return encode_problem(tokenizer, prompt, PROMPT_SUFFIX if suffix is None else suffix, use_chat_template)
    messages = [dict(m) for m in prompt]
    return encode_messages(tokenizer, messages, use_chat_template)


# ----------------------------------------------------------------------------- models


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizers(base_path: str, rl_path: str, tokenizer_path: str | None):
    """The analysis tokenizer (`tokenizer_path` or the base model's); the RL model's own one, when it
    ships one, must be identical (`check_same_tokenizer`)."""
    from transformers import AutoTokenizer

    from verl_ext.analysis.token_metrics import check_same_tokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path or base_path)
    try:
        rl_tok = AutoTokenizer.from_pretrained(rl_path)
    except (OSError, ValueError):
        rl_tok = None  # checkpoint without tokenizer files: the model head size is still checked
    if rl_tok is not None:
        check_same_tokenizer(tok, rl_tok)
    return tok


@dataclass
class WorkerSpec:
    """Everything a worker (in process or a Ray actor) needs to load the models and do a shard."""

    base_model: str
    rl_model: str
    tokenizer: str
    device: str
    dtype: str
    sampling: dict
    scoring: dict
    show_progress: bool


class AnalysisWorker:
    """Holds π_B and π_RL (loaded lazily) and does shard tasks: sample responses, score tokens."""

    def __init__(self, spec: WorkerSpec):
        from transformers import AutoTokenizer

        self.spec = spec
        self.device = resolve_device(spec.device)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
        self._models: dict[str, Any] = {}  # transformers models by generator
        self._engines: dict[str, Any] = {}  # vLLM engines by generator (sampling with backend=vllm)
        self._scorer = None
        self._token_text: dict[int, str] = {}

    def model(self, which: str):
        """The transformers model `base` or `rl` on this worker's device."""
        from verl_ext.core.models import load_hf_model

        if which not in ("base", "rl"):
            raise ValueError(f"generator {which!r} is not a model this command holds; valid choices: base, rl")
        if which not in self._models:
            dtype = None if self.spec.dtype == "auto" else self.spec.dtype
            path = self.spec.base_model if which == "base" else self.spec.rl_model
            self._models[which] = load_hf_model(path, device=self.device, dtype=dtype)
        return self._models[which]

    def scorer(self):
        from verl_ext.analysis.token_metrics import PairScorer, check_head_reproduces_logits

        if self._scorer is None:
            base, rl = self.model("base"), self.model("rl")
            probe = self.tokenizer("Check the output head.", add_special_tokens=False)["input_ids"] or [0]
            check_head_reproduces_logits(base, probe)
            check_head_reproduces_logits(rl, probe)
            self._scorer = PairScorer(base, rl, **self.spec.scoring)
        return self._scorer

    def sample(self, job: SampleTask) -> pa.Table:
        """Phase 1: `sampling.n` responses per prompt of the shard from `job.generator`."""
        from verl_ext.generation import resolve_backend, sample_responses

        generator, task, seed = job.generator, job.shard, job.seed
        s = self.spec.sampling
        backend = resolve_backend(s.get("backend", "hf"))
        model = self.model(generator) if backend == "hf" else self.vllm_engine(generator)
        gens = sample_responses(
            model,
            self.tokenizer,
            [ids for _, ids in task.prompts],
            s["n"],
            temperature=s["temperature"],
            top_p=s["top_p"],
            top_k=s["top_k"],
            max_new_tokens=s["max_new_tokens"],
            seed=seed,
            batch_size=s["batch_size"],
            backend=backend,
            device=self.device,
            show_progress=False,
        )
        records = []
        for g in gens:
            p = task.prompts[g.prompt_index][0]
            records.append(
                ResponseRecord(
                    response_id=f"{generator}-{p}-{g.sample_index}",
                    generator=generator,
                    prompt_index=p,
                    sample_index=g.sample_index,
                    prompt_ids=list(g.prompt_ids),
                    response_ids=list(g.response_ids),
                    response_text=g.response_text,
                    finish_reason=g.finish_reason,
                )
            )
        return records_to_table(records)

    def token_texts(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self._token_text})
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing])):
                self._token_text[i] = text
        return [self._token_text[i] for i in ids]

    def score(self, task: ShardTask) -> pa.Table:
        """Phase 2: one row per response token with every METRIC."""
        from verl_ext.analysis.token_metrics import SequencePair

        records = [r for r in task.records if r.response_ids]
        progress = None
        if self.spec.show_progress:
            from tqdm import tqdm

            progress = tqdm(
                total=sum(len(r.response_ids) for r in records),
                desc=f"scoring shard {task.index}",
                unit="tok",
                leave=False,
            )
        metrics = self.scorer().score([SequencePair(r.prompt_ids, r.response_ids) for r in records], progress=progress)
        if progress is not None:
            progress.close()
        return token_table(records, metrics, self.token_texts)

    def vllm_engine(self, generator: str):
        """One `vllm.LLM` per worker, for `generator` (an engine for the other generator is dropped first)."""
        if generator not in self._engines:
            from verl_ext.generation import load_vllm

            self._engines.clear()
            path = self.spec.base_model if generator == "base" else self.spec.rl_model
            self._engines[generator] = load_vllm(path, seed=self.spec.sampling["seed"])
        return self._engines[generator]


def token_table(records: list[ResponseRecord], metrics: list[dict], token_texts) -> pa.Table:
    """Per-token rows (TOKEN_SCHEMA) from records and their per-sequence metric tensors."""
    lengths = [len(r.response_ids) for r in records]
    token_ids = [t for r in records for t in r.response_ids]
    cols: dict[str, Any] = {
        "response_id": [r.response_id for r, n in zip(records, lengths) for _ in range(n)],
        "generator": [r.generator for r, n in zip(records, lengths) for _ in range(n)],
        "prompt_index": np.repeat(np.asarray([r.prompt_index for r in records], dtype=np.int32), lengths),
        "sample_index": np.repeat(np.asarray([r.sample_index for r in records], dtype=np.int32), lengths),
        "position": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths] or [np.zeros(0, np.int32)]),
        "token_id": np.asarray(token_ids, dtype=np.int32),
        "token_text": token_texts(token_ids),
    }
    for m in METRICS:
        cols[m] = np.concatenate([x[m].numpy() for x in metrics] or [np.zeros(0, np.float32)]).astype(np.float32)
    return pa.Table.from_pydict(cols, schema=TOKEN_SCHEMA)


# ----------------------------------------------------------------------------- the command


def resume_settings(cfg: DictConfig) -> dict:
    """The parts of the config that determine the shard contents (`manifest.json`, checked on resume)."""
    keep = {k: cfg.models[k] for k in ("base", "rl", "tokenizer", "dtype", "tiny_rl_noise")}
    keep["input"] = cfg.input
    keep["sharding"] = cfg.sharding
    if cfg.input.source == "sample":
        keep["sampling"] = {k: v for k, v in OmegaConf.to_container(cfg.sampling).items() if k != "batch_size"}
    data = OmegaConf.to_container(OmegaConf.create(keep), resolve=True)
    data["version"] = MANIFEST_VERSION
    return data


def resolve_models(cfg: DictConfig, out: Path) -> tuple[str, str, str | None, Any]:
    """(base path, RL path, tokenizer path, tiny assets or None) with the tiny defaults filled in."""
    tiny = None
    base, rl = cfg.models.base, cfg.models.rl
    if base is None:
        from verl_ext.tiny_assets import ensure_tiny_assets

        tiny = ensure_tiny_assets()
        base = str(tiny.model_dir)
        if rl is None:
            from verl_ext.tiny_assets import save_perturbed_copy

            rl = str(save_perturbed_copy(base, out / "tiny_rl_model", cfg.models.tiny_rl_noise))
    if rl is None:
        raise ValueError(
            "models.rl is not set: give the RLVR model's path (models.rl=null only works with the tiny default models.base=null)"
        )
    for key, path in (("models.base", base), ("models.rl", rl)):
        if not Path(path).exists() and (Path(path).is_absolute() or str(path).startswith(".")):
            raise FileNotFoundError(f"{key}={path!r}: no such model directory")
    return str(base), str(rl), cfg.models.tokenizer, tiny


def load_prompts(cfg: DictConfig, tokenizer, tiny) -> list[tuple[int, list[int]]]:
    """(prompt_index, token ids) of the prompts to sample from (at most input.max_prompts)."""
    path = cfg.input.prompts
    if path is None:
        if tiny is None:
            raise ValueError("input.prompts is not set: give a parquet (verl RL format) or jsonl file of prompts")
        path = tiny.val_parquet
    rows = read_prompt_rows(path, cfg.input.prompt_key)
    if cfg.input.max_prompts is not None:
        rows = rows[: cfg.input.max_prompts]
    return [
        (i, encode_prompt(tokenizer, r, cfg.input.use_chat_template, cfg.input.prompt_suffix))
        for i, r in enumerate(rows)
    ]


def load_file_records(cfg: DictConfig, tokenizer) -> list[ResponseRecord]:
    """Records from `input.files` (a list of {path, generator}); generator may be null for parquet with a `generator` column."""
    if not cfg.input.files:
        raise ValueError("input.source=files but input.files is empty: give [{path: ..., generator: base|rl}, ...]")
    records: list[ResponseRecord] = []
    for item in cfg.input.files:
        path, gen = Path(item["path"]), item.get("generator")
        if path.suffix == ".parquet":
            records += read_generation_parquet(path, gen)
        elif path.suffix == ".jsonl" or path.is_dir():
            if gen is None:
                raise ValueError(f"{path}: verl dumps do not say which model generated them: set generator")
            warnings.warn(
                f"{path}: verl dumps hold decoded text without special tokens; responses are re-tokenised", stacklevel=2
            )
            records += read_verl_dump(path, gen, tokenizer, cfg.input.get("verl_dump_steps"))
        else:
            raise ValueError(f"{path}: expected a .parquet file, a verl .jsonl dump or a dump folder")
    ids = [r.response_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("input.files give duplicate response ids (the same file twice?)")
    if cfg.input.get("max_responses") is not None:
        records = records[: cfg.input.max_responses]
    return records


def plan_sampling_shards(prompts: list[tuple[int, list[int]]], per_shard: int) -> list[ShardTask]:
    if per_shard < 1:
        raise ValueError(f"sharding.prompts_per_shard must be >= 1, got {per_shard}")
    return [
        ShardTask(index=i // per_shard, prompts=prompts[i : i + per_shard]) for i in range(0, len(prompts), per_shard)
    ]


def plan_scoring_shards(records: list[ResponseRecord], per_shard: int) -> list[ShardTask]:
    if per_shard < 1:
        raise ValueError(f"sharding.responses_per_shard must be >= 1, got {per_shard}")
    return [
        ShardTask(index=i // per_shard, records=records[i : i + per_shard]) for i in range(0, len(records), per_shard)
    ]


def run_sampling(cfg: DictConfig, pool: WorkerPool, prompts, out: Path) -> list[ShardTask]:
    """Phase 1: write generations/<generator>/shard-*.parquet (missing ones only); returns scoring tasks."""
    generators = list(cfg.sampling.generators)
    if not generators or any(g not in ("base", "rl") for g in generators):
        raise ValueError(f"sampling.generators={generators} is invalid; valid: a non-empty list of base, rl")
    tasks = plan_sampling_shards(prompts, cfg.sharding.prompts_per_shard)
    print(f"[analyze_logp_diff] size: {len(generators)} generator(s) x "
          f"{size_line(len(prompts), cfg.sampling.n, cfg.sampling.max_new_tokens)} each", flush=True)
    calls = [
        SampleTask(g, t, shard_seed(cfg.sampling.seed, t.index, gi))
        for gi, g in enumerate(generators)
        for t in tasks
        if not (out / "generations" / g / shard_name(t.index)).is_file()
    ]

    def write(job: SampleTask, table: pa.Table) -> None:
        atomic_write_parquet(out / "generations" / job.generator / shard_name(job.shard.index), table)

    pool.map(AnalysisWorker.sample, calls, write, progress="sampling")
    if cfg.sampling.backend != "hf" and calls:
        pool.restart()  # drop the vLLM engines (new Ray actors) before loading both models for scoring
    scoring = []
    for t in tasks:
        records = []
        for g in generators:
            records += records_from_table(pq.read_table(out / "generations" / g / shard_name(t.index)))
        scoring.append(ShardTask(index=t.index, records=records))
    return scoring


def run_scoring(pool: WorkerPool, tasks: list[ShardTask], out: Path) -> list[int]:
    """Phase 2: write tokens/shard-*.parquet for the shards that are missing; returns their indices."""
    todo = [t for t in tasks if not (out / "tokens" / shard_name(t.index)).is_file()]
    computed: list[int] = []

    def write(task: ShardTask, table: pa.Table) -> None:
        atomic_write_parquet(out / "tokens" / shard_name(task.index), table)
        computed.append(task.index)

    pool.map(AnalysisWorker.score, todo, write, progress="scoring")
    return sorted(computed)


def read_token_metrics(out: Path):
    """All token rows of a finished run as a pandas DataFrame."""
    files = sorted((out / "tokens").glob("shard-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{out / 'tokens'}: no shard files; run the analysis first")
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()


def figure_caption(cfg: DictConfig, df) -> str:
    """What every analysis figure says about itself: the two models, the data and the sample size. The
    tiny default's RL model is a randomly perturbed copy of the base, and the caption says so."""
    base = figure_name(cfg.models.base) if cfg.models.base else "tiny base model"
    if cfg.models.rl:
        rl = figure_name(cfg.models.rl)
    else:
        rl = f"STAND-IN (not RL-trained: π_B + {cfg.models.tiny_rl_noise:g}·std·noise)"
    if cfg.input.source == "sample":
        data = figure_name(cfg.input.prompts) if cfg.input.prompts else "tiny arithmetic validation prompts"
        size = f"{df['prompt_index'].nunique()} prompts × {cfg.sampling.n} samples per generator"
        sampling = f"T={cfg.sampling.temperature:g}, top-p={cfg.sampling.top_p:g}"
        return f"π_B = {base}, π_RL = {rl}; {data}, {size} ({sampling})"
    data = ", ".join(figure_name(f["path"]) for f in cfg.input.files)
    return f"π_B = {base}, π_RL = {rl}; responses from {data} ({df['response_id'].nunique()} responses)"


def write_report(cfg: DictConfig, out: Path) -> dict[str, Path]:
    """Plots, tables and summary from the token shards; returns the written files by name."""
    import pandas as pd

    from verl_ext.analysis import plots, report

    df = read_token_metrics(out)
    r = cfg.report
    files: dict[str, Path] = {}
    caption = figure_caption(cfg, df)
    files["histograms"] = plots.plot_metric_histograms(df, out / "histograms.png", bins=r.histogram_bins,
                                                       caption=caption)
    bins = report.probability_by_delta_bins(df, list(r.delta_bin_edges))
    bins.to_csv(out / "prob_by_delta_bin.csv", index=False)
    files["prob_by_delta_bin"] = plots.plot_probability_by_delta_bins(bins, out / "prob_by_delta_bin.png",
                                                                      caption=caption)
    files["prob_by_delta_bin_csv"] = out / "prob_by_delta_bin.csv"
    up, down = report.top_tokens(df, r.top_k, r.min_token_count)
    for name, table in (("top_tokens_up", up), ("top_tokens_down", down)):
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(report.markdown_table(table) + "\n")
        files[name] = out / f"{name}.csv"
    cloud = plots.plot_word_clouds(up, down, out / "top_tokens_wordcloud.png")
    if cloud is not None:
        files["wordcloud"] = cloud
    thresholds = list(r.tail_thresholds)
    summary = report.summary_dict(df, thresholds)
    summary["output_dir"] = str(out)
    report.write_json(summary, out / "summary.json")
    md = report.summary_markdown(summary, thresholds)
    md += "\n## Most raised tokens (mean Δlog p)\n\n" + report.markdown_table(up.head(10)) + "\n"
    md += "\n## Most lowered tokens (mean Δlog p)\n\n" + report.markdown_table(down.head(10)) + "\n"
    (out / "summary.md").write_text(md)
    files["summary_md"], files["summary_json"] = out / "summary.md", out / "summary.json"
    maybe_log_wandb(cfg, df, summary, files, pd.concat([up.assign(direction="up"), down.assign(direction="down")]))
    return files


def maybe_log_wandb(cfg: DictConfig, df, summary: dict, files: dict[str, Path], tokens_table) -> bool:
    """Histograms (per metric and generator), top-token table, figures and summary numbers to wandb."""
    out = Path(cfg.output_dir).resolve()
    run = start_run(
        cfg.wandb,
        default_name=f"analyze_logp_diff-{out.name}",
        config=OmegaConf.to_container(cfg, resolve=True),
        out_dir=out,
        job_type="analysis",
    )
    if run is None:
        return False
    import wandb

    logs: dict[str, Any] = {}
    for gen, g in df.groupby("generator"):
        for m in METRICS:
            v = g[m].to_numpy(np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                logs[f"hist/{m}/{gen}"] = wandb.Histogram(
                    np_histogram=np.histogram(v, bins=min(512, cfg.report.histogram_bins))
                )
        for tau, t in summary["generators"][gen]["tails"].items():
            logs[f"tails/{gen}/frac_below_neg_{tau}"] = t["frac_below_neg_tau"]
            logs[f"tails/{gen}/frac_above_{tau}"] = t["frac_above_tau"]
    logs["top_tokens"] = wandb.Table(dataframe=tokens_table.reset_index(drop=True))
    for name in ("histograms", "prob_by_delta_bin", "wordcloud"):
        if name in files:
            logs[f"figures/{name}"] = wandb.Image(str(files[name]))
    run.log(logs)
    run.finish()
    return True


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive_int(value, key, allow_none=False):
    return check_number(value, key, low=1, integer=True, allow_none=allow_none)


def validate(cfg: DictConfig) -> None:
    """Every setting checked before any model is loaded or anything written: a ConfigError naming the key,
    the value and the valid choices. The prompts file is read here (not the models): an empty file, a
    malformed JSONL line or a row without `input.prompt_key` is refused with its line."""
    from verl_ext.generation import BACKENDS

    check_choice(cfg.input.source, "input.source", SOURCES)
    for key in ("overwrite", "show_progress", "input.use_chat_template"):
        check_flag(OmegaConf.select(cfg, key), key)
    wandb_enabled(cfg.wandb.enable)  # a bad setting fails now, not after the scoring
    if not DEVICE.fullmatch(str(cfg.models.device)):
        raise invalid("models.device", cfg.models.device, "auto, cpu, cuda, cuda:N")
    check_choice(cfg.models.dtype, "models.dtype", DTYPES)
    check_writable_dir(cfg.output_dir, "output_dir")
    check_sampling(cfg.sampling, "sampling", keys=("n", "temperature", "top_p", "top_k", "max_new_tokens",
                                                   "batch_size", "seed"))
    check_choice(cfg.sampling.backend, "sampling.backend", BACKENDS)
    generators = check_list(cfg.sampling.generators, "sampling.generators")  # a bare name: refused, not read letter by letter
    if any(g not in ("base", "rl") for g in generators):
        raise invalid("sampling.generators", generators, "a non-empty list of base, rl")
    for key in ("chunk_size", "batch_size", "max_batch_tokens"):
        _positive_int(cfg.scoring[key], f"scoring.{key}")
    _positive_int(cfg.scoring.block_rows, "scoring.block_rows", allow_none=True)
    _positive_int(cfg.sharding.prompts_per_shard, "sharding.prompts_per_shard")
    _positive_int(cfg.sharding.responses_per_shard, "sharding.responses_per_shard")
    check_ray(cfg.ray)
    r = cfg.report
    _positive_int(r.histogram_bins, "report.histogram_bins")
    check_list(r.tail_thresholds, "report.tail_thresholds", lambda v, k: check_number(v, k, low=0))
    edges = check_list(r.delta_bin_edges, "report.delta_bin_edges", lambda v, k: check_number(v, k))
    if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise invalid("report.delta_bin_edges", edges, "at least 2 strictly increasing numbers")
    _positive_int(r.top_k, "report.top_k")
    _positive_int(r.min_token_count, "report.min_token_count")
    check_number(cfg.models.tiny_rl_noise, "models.tiny_rl_noise", low=0)
    for key in ("base", "rl", "tokenizer"):
        if cfg.models[key] is not None:
            check_model_source(cfg.models[key], f"models.{key}")
    if cfg.models.base is not None and cfg.models.rl is None:
        raise ConfigError(
            "models.rl is not set: give the RLVR model's path (models.rl=null only works with the tiny default models.base=null)"
        )
    _positive_int(cfg.input.max_prompts, "input.max_prompts", allow_none=True)
    _positive_int(cfg.input.get("max_responses"), "input.max_responses", allow_none=True)
    if cfg.input.source == "sample":
        if cfg.input.prompts is not None:
            check_file(cfg.input.prompts, "input.prompts", suffixes=(".parquet", ".jsonl"))
            if not read_prompt_rows(cfg.input.prompts, cfg.input.prompt_key):
                raise ConfigError(f"input.prompts={str(cfg.input.prompts)!r}: the file has no rows")
        elif cfg.models.base is not None:
            raise ConfigError("input.prompts is not set: give a parquet (verl RL format) or jsonl file of prompts")
    else:
        if not cfg.input.files:
            raise ConfigError("input.source=files but input.files is empty: give [{path: ..., generator: base|rl}, ...]")
        for i, item in enumerate(cfg.input.files):
            path = item.get("path") if hasattr(item, "get") else None
            if not path or not Path(str(path)).exists():
                raise ConfigError(f"input.files[{i}].path={path!r}: no such file or folder")


def run(cfg: DictConfig) -> dict[str, Path]:
    """The whole analysis (see the module docstring); returns the report files."""
    from verl_ext.merge import resolve_config_paths

    resolve_config_paths(cfg, ("models.base", "models.rl", "models.tokenizer"))  # a training run's folder: its merged model
    validate(cfg)
    out = Path(cfg.output_dir).resolve()
    check_resume(out, resume_settings(cfg), ("generations", "tokens"), overwrite=cfg.overwrite,
                 redo_hint="overwrite=true to delete them")
    base, rl, tok_path, tiny = resolve_models(cfg, out)
    tokenizer = load_tokenizers(base, rl, tok_path)
    spec = WorkerSpec(
        base_model=base,
        rl_model=rl,
        tokenizer=tok_path or base,
        device=cfg.models.device,
        dtype=cfg.models.dtype,
        sampling=OmegaConf.to_container(cfg.sampling, resolve=True),
        scoring=OmegaConf.to_container(cfg.scoring, resolve=True),
        show_progress=cfg.show_progress,
    )
    pool = WorkerPool(functools.partial(AnalysisWorker, spec), cfg.ray, use_gpus=cfg.models.device != "cpu",
                      show_progress=cfg.show_progress)
    with pool:
        if cfg.input.source == "sample":
            tasks = run_sampling(cfg, pool, load_prompts(cfg, tokenizer, tiny), out)
        else:
            tasks = plan_scoring_shards(load_file_records(cfg, tokenizer), cfg.sharding.responses_per_shard)
        computed = run_scoring(pool, tasks, out)
    print(
        f"[analyze_logp_diff] {len(tasks)} shard(s), {len(computed)} computed now, {len(tasks) - len(computed)} reused"
    )
    files = write_report(cfg, out)
    print(f"[analyze_logp_diff] token metrics: {out / 'tokens'}")
    for name, path in files.items():
        print(f"[analyze_logp_diff] {name}: {path}")
    return files


@hydra.main(config_path=str(config_dir()), config_name="analyze_logp_diff", version_base=None)
def main(cfg: DictConfig) -> None:
    with exit_on_config_error("analyze_logp_diff", (ConfigError, ValueError, FileNotFoundError)):
        run(cfg)


if __name__ == "__main__":
    main()
