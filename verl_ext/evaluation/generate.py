"""Evaluation sampling on the shared job runner (`verl_ext.jobs`): problems in shards, one file each.

- A shard is `shard_problems` consecutive problems × `sampling.n` samples. Its records go atomically
  to `<output_dir>/generations/shard-XXXXX.parquet`; a rerun with the same output_dir generates only
  the missing shards (`jobs.check_resume` refuses to mix shards of other settings).
- Workers (`EvalWorker`) load the tokenizer and the model once (a transformers model, or a vLLM
  engine with backend=vllm), in this process or as Ray actors (one per GPU; `ray:` block).
- Seeds: shard i samples with `shard_seed(seed, i)`; shard 0 uses `seed` itself, so a run that fits
  in one shard draws what an unsharded run draws. The tokens therefore depend on `shard_problems` and
  (backend hf) `sampling.batch_size`, both part of the resume settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_ext.core.atomic_io import atomic_write_parquet
from verl_ext.jobs import WorkerPool, shard_name, shard_seed


@dataclass(frozen=True)
class EvalSpec:
    """What a worker needs to load its model and sample (plain values: it travels to Ray actors)."""

    model: str
    tokenizer: str
    backend: str  # hf | vllm (resolved)
    device: str | None
    dtype: str | None
    use_chat_template: bool
    sampling: dict  # n, temperature, top_p, top_k, max_new_tokens, seed, batch_size
    show_progress: bool = False


@dataclass(frozen=True)
class EvalShard:
    """Problems[start:stop] of the evaluation set, as shard `index`."""

    index: int
    problems: tuple  # the problem dicts of `evaluation.command.load_problems`

    @property
    def file_name(self) -> str:
        return shard_name(self.index)


def plan_shards(problems: list[dict], shard_problems: int) -> list[EvalShard]:
    """Consecutive runs of `shard_problems` problems (the last may be shorter)."""
    if shard_problems < 1:
        raise ValueError(f"shard_problems={shard_problems} is invalid; valid: an integer >= 1")
    return [EvalShard(i // shard_problems, tuple(problems[i : i + shard_problems]))
            for i in range(0, len(problems), shard_problems)]


class EvalWorker:
    """Holds the tokenizer and the model (loaded at the first shard) and samples shards."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        self._tokenizer = None
        self._model = None

    def _load(self):
        if self._model is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.spec.tokenizer)
            if self.spec.backend == "vllm":
                from verl_ext.generation import load_vllm

                self._model = load_vllm(self.spec.model, seed=self.spec.sampling["seed"])
            else:
                from verl_ext.core.models import load_hf_model

                self._model = load_hf_model(self.spec.model, self.spec.device, self.spec.dtype)
        return self._model, self._tokenizer

    def generate(self, shard: EvalShard) -> list[dict]:
        """`sampling.n` records per problem of the shard, ordered by (problem, sample)."""
        from verl_ext.core.prompts import encode_messages
        from verl_ext.generation import sample_responses

        model, tokenizer = self._load()
        s = self.spec.sampling
        prompts = [encode_messages(tokenizer, p["messages"], self.spec.use_chat_template) for p in shard.problems]
        generations = sample_responses(
            model, tokenizer, prompts, s["n"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
            max_new_tokens=s["max_new_tokens"], seed=shard_seed(s["seed"], shard.index), batch_size=s["batch_size"],
            backend=self.spec.backend, device=self.spec.device, show_progress=self.spec.show_progress,
        )
        return [
            {
                "data_source": shard.problems[g.prompt_index]["data_source"],
                "prompt_id": shard.problems[g.prompt_index]["prompt_id"],
                "sample_index": g.sample_index,
                "ground_truth": shard.problems[g.prompt_index]["ground_truth"],
                "accepted_answers": list(shard.problems[g.prompt_index]["accepted_answers"]),
                "response": g.response_text,
                "response_length": len(g.response_ids),
                "finish_reason": g.finish_reason,
            }
            for g in generations
        ]


def write_shard(path: Path, records: list[dict]) -> None:
    import pyarrow as pa

    atomic_write_parquet(path, pa.Table.from_pylist(records))


def read_shard(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def generate_all(spec: EvalSpec, problems: list[dict], shard_problems: int, folder: Path, ray_cfg: Any,
                 show_progress: bool) -> tuple[list[dict], int, int]:
    """Write the missing shards under `folder` (a WorkerPool of EvalWorkers); returns every record, in
    shard order, the number of shards generated now and the number of shards."""
    import functools

    shards = plan_shards(problems, shard_problems)
    todo = [s for s in shards if not (folder / s.file_name).is_file()]
    pool = WorkerPool(functools.partial(EvalWorker, spec), ray_cfg, use_gpus=spec.device != "cpu",
                      show_progress=show_progress)
    with pool:
        pool.map(EvalWorker.generate, todo, lambda shard, records: write_shard(folder / shard.file_name, records),
                 progress="shards" if len(shards) > 1 else None)
    records = [r for s in shards for r in read_shard(folder / s.file_name)]
    return records, len(todo), len(shards)
