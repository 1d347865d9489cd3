"""verl rollout backend `hf_reproducible`: transformers generation whose reruns are bit-identical.

On GPU clusters and on CPU alike, training runs verl's own `vllm` rollout (on a machine without a
GPU, vLLM's CPU build: `verl_ext/vllm_cpu.py`). vLLM has no batch-invariant mode on CPU, so two
runs with the same seed differ there. This backend exists for the runs that must not: select it
with `actor_rollout_ref.rollout.name=hf_reproducible actor_rollout_ref.rollout.full_determinism=true`
(the recipe refuses it without full_determinism, which also makes the trainer's batches
timing-independent: `verl_ext.trainer`). Three pieces, registered with verl in
`verl_ext.cpu.register_rollout()`:

- `HFRolloutServer`, a Ray actor (one per replica) holding a transformers model. verl's agent
  loop sends it one request per sequence (`generate(prompt_ids, sampling_params, ...)`); the
  server queues them and runs them as batches (`hf_generate.generate_batch`): a batch starts
  when requests stop arriving for `batch_idle_ms` (or after `max_batch_wait_ms`, or at
  `rollout.max_num_seqs` requests). It returns token ids and the log-prob of each sampled token
  under the distribution it was sampled from (after temperature/top-k/top-p, as vLLM's
  processed log-probs; see `hf_generate`).
- `HFReplica`, the `RolloutReplica` that starts those servers.
- `HFServerAdapter`, the worker-side `BaseRollout`: after every training step verl calls its
  `update_weights`, which pushes the trainer's full weights to the server in buckets; the
  server swaps them in atomically between batches.

Why reruns are identical: every request samples from its own counter-based random stream
(`verl_ext.decoding.rng`), keyed by the weights' version, verl's request id, the prompt and the
sampling parameters (`_stream_id`), so a rerun, and a run resumed from a checkpoint, draws the same
responses for the same prompts even though requests arrive, and are batched, in a different order.
Every forward has one shape (width `rollout.prompt_length`, chunks of `deterministic_chunk_rows`
rows) and eager attention (multi-threaded SDPA decoding on CPU depends on the other rows), so the
log-probs, not only the tokens, are bit-identical in any batch.

Options (`+actor_rollout_ref.rollout.engine_kwargs.hf_reproducible.<key>=...`): `num_threads`
(torch threads of the server; default all cores, as rollout and training alternate),
`batch_idle_ms` (20), `max_batch_wait_ms` (500), `deterministic_chunk_rows` (16).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Generator
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from verl_ext.cpu.hf_generate import SamplingSpec, generate_batch, sampling_spec_from
from verl_ext.decoding import rng

logger = logging.getLogger(__name__)

BACKEND = "hf_reproducible"
DEFAULT_ENGINE_KWARGS = {
    "num_threads": None,
    "batch_idle_ms": 20.0,
    "max_batch_wait_ms": 500.0,
    "deterministic_chunk_rows": 16,
}


def stable_stream_id(name: str) -> int:
    """A 63-bit id from a string (blake2b): unlike hash(), the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def server_actor_name(replica_rank: int, node_rank: int = 0, suffix: str = "") -> str:
    """Ray actor name of a replica's server (the adapter finds it by this name)."""
    return f"{BACKEND}_server_{replica_rank}_{node_rank}{suffix}"


def engine_kwargs(config: RolloutConfig) -> dict:
    """`rollout.engine_kwargs.hf_reproducible` merged over the defaults; unknown keys are an error."""
    given = dict((config.engine_kwargs or {}).get(BACKEND) or {})
    unknown = set(given) - set(DEFAULT_ENGINE_KWARGS)
    if unknown:
        raise ValueError(
            f"actor_rollout_ref.rollout.engine_kwargs.{BACKEND}: unknown keys {sorted(unknown)}; "
            f"valid keys: {sorted(DEFAULT_ENGINE_KWARGS)}"
        )
    return {**DEFAULT_ENGINE_KWARGS, **given}


def _torch_dtype(name: str) -> torch.dtype:
    dtypes = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in dtypes:
        raise ValueError(f"actor_rollout_ref.rollout.dtype={name!r}; valid for {BACKEND}: {sorted(dtypes)}")
    return dtypes[name]


def load_rollout_model(model_config: HFModelConfig, dtype: torch.dtype, load_format: str, attention: str = "sdpa"):
    """The generation model: real weights, or random ones for `load_format=dummy*` (the trainer
    pushes its weights before the first rollout either way). `attention`: the transformers
    attention implementation ("eager" is batch-invariant on CPU; multi-threaded "sdpa" decoding is
    not)."""
    from transformers import AutoModelForCausalLM

    path = model_config.local_path
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"actor_rollout_ref.model.path: model directory {path!r} does not exist")
    kwargs = {"dtype": dtype, "attn_implementation": attention, "trust_remote_code": model_config.trust_remote_code}
    if load_format.startswith("dummy"):
        model = AutoModelForCausalLM.from_config(model_config.hf_config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


class _Request:
    __slots__ = ("future", "prompt_ids", "spec", "stream_id", "want_log_probs")

    def __init__(self, prompt_ids: list[int], spec: SamplingSpec, want_log_probs: bool, stream_id: int | None = None):
        self.prompt_ids = prompt_ids
        self.spec = spec
        self.want_log_probs = want_log_probs
        self.stream_id = stream_id
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()


class HFRolloutServer:
    """Ray actor: batched token-in/token-out generation with a transformers model."""

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        rollout_mode: RolloutMode,
        workers: list,
        replica_rank: int,
        node_rank: int = 0,
    ):
        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.options = engine_kwargs(self.config)
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.node_rank = node_rank
        torch.set_num_threads(int(self.options["num_threads"] or os.cpu_count() or 1))

        self.model = load_rollout_model(
            self.model_config, _torch_dtype(self.config.dtype), self.config.load_format, attention="eager"
        )
        self.eos_token_ids = self._eos_token_ids()
        self.pad_token_id = self._pad_token_id()
        self.generator = torch.Generator().manual_seed(self.config.seed + replica_rank)
        self._request_counts: Counter[str] = Counter()  # how often each request came (`_stream_id`)
        self.global_steps: int | None = None

        self._queue: list[_Request] = []
        self._queue_changed: asyncio.Event | None = None
        self._engine_lock: asyncio.Lock | None = None  # held while generating or swapping weights
        self._worker_task: asyncio.Task | None = None
        self._staged_weights: dict[str, torch.Tensor] = {}
        self._abort = False
        self._rejecting = False
        self.stats = {"batches": 0, "sequences": 0, "new_tokens": 0, "weight_updates": 0}

    # ------------------------------------------------------------------ setup helpers

    def _eos_token_ids(self) -> list[int]:
        ids = set()
        for source in (self.model.generation_config, self.model_config.hf_config):
            eos = getattr(source, "eos_token_id", None)
            ids |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        tokenizer = self.model_config.tokenizer
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        if not ids and not self.config.ignore_eos:
            raise ValueError(
                f"model {self.model_config.local_path}: no eos_token_id in its generation or model config "
                "(set one, or actor_rollout_ref.rollout.ignore_eos=True)"
            )
        return sorted(ids)

    def _pad_token_id(self) -> int:
        tokenizer = self.model_config.tokenizer
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            return tokenizer.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def _ensure_worker(self) -> None:
        """Start the batching loop on the actor's event loop (first call only)."""
        if self._worker_task is None:
            self._queue_changed = asyncio.Event()
            self._engine_lock = asyncio.Lock()
            self._worker_task = asyncio.get_running_loop().create_task(self._batch_loop())

    # ------------------------------------------------------------------ generation

    def _max_tokens_default(self, prompt_len: int) -> int:
        """verl's rule: at most response_length, within prompt_length + response_length in total."""
        cfg = self.config
        return max(1, min(cfg.response_length, cfg.prompt_length + cfg.response_length - prompt_len))

    def _max_possible_tokens(self, prompt_len: int) -> int:
        limit = self.config.max_model_len or self.model_config.hf_config.max_position_embeddings
        if prompt_len >= limit:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room to generate within {limit} positions")
        return limit - prompt_len

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        **kwargs,
    ) -> TokenOutput:
        """Queue one request and wait for its batch (verl's server protocol, token in/token out)."""
        if image_data is not None or video_data is not None:
            raise ValueError(f"{BACKEND} rollout: multi-modal inputs are not supported (text models only)")
        self._ensure_worker()
        if self._rejecting:
            return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted", extra_fields=self._extra())
        prompt_ids = [int(t) for t in prompt_ids]
        params = dict(sampling_params)
        want_log_probs = bool(params.get("logprobs", False))
        spec = sampling_spec_from(
            params,
            default_max_tokens=self._max_tokens_default(len(prompt_ids)),
            eos_token_ids=[] if self.config.ignore_eos else self.eos_token_ids,
            max_possible_tokens=self._max_possible_tokens(len(prompt_ids)),
        )
        request = _Request(prompt_ids, spec, want_log_probs, self._stream_id(request_id, prompt_ids, spec))
        self._queue.append(request)
        self._queue_changed.set()
        return await request.future

    def _stream_id(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> int:
        """The request's own random stream, keyed by what the request is (id, prompt tokens,
        sampling parameters) and by how many identical requests came before.

        verl's synchronous agent loop names requests by their row ("det-<row>"), but the v1 trainer's
        TransferQueue loop passes no row, so every request there is "det-0": the prompt keeps distinct
        prompts apart whatever order they arrive in. Identical requests (the n samples of one prompt)
        are exchangeable: which of them gets which stream changes no group's set of responses.

        The weights' version (`global_steps` of the last weight push) is part of the key and the counts
        restart with every version, so a run resumed from step N (whose first push is version N) draws
        what the uninterrupted run drew after its step N, not what it drew at step 0."""
        key = f"v{self.global_steps}|{request_id}|{','.join(map(str, prompt_ids))}|{spec!r}"
        occurrence = self._request_counts[key]
        self._request_counts[key] += 1
        return stable_stream_id(f"{key}#{occurrence}")

    def _extra(self) -> dict:
        return {"global_steps": self.global_steps}

    async def _collect_batch(self) -> list[_Request]:
        """Wait for a first request, then until arrivals pause (or the wait/size limit is hit)."""
        while not self._queue:
            self._queue_changed.clear()
            await self._queue_changed.wait()
        idle, deadline = (
            self.options["batch_idle_ms"] / 1000,
            time.monotonic() + self.options["max_batch_wait_ms"] / 1000,
        )
        while len(self._queue) < self.config.max_num_seqs and time.monotonic() < deadline:
            seen = len(self._queue)
            await asyncio.sleep(idle)
            if len(self._queue) == seen:
                break
        batch, self._queue = self._queue[: self.config.max_num_seqs], self._queue[self.config.max_num_seqs :]
        return batch

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._collect_batch()
            async with self._engine_lock:
                try:
                    results = await asyncio.to_thread(self._run_batch, batch)
                except Exception as err:  # deliver the error to every caller, keep serving
                    logger.exception("%s rollout batch failed", BACKEND)
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(err)
                    continue
            for request, output in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(output)

    def _row_keys(self, batch: list[_Request]) -> torch.Tensor:
        return rng.sequence_keys(self.config.seed + self.replica_rank, torch.tensor([r.stream_id for r in batch]))

    def _run_batch(self, batch: list[_Request]) -> list[TokenOutput]:
        generations = generate_batch(
            self.model,
            [r.prompt_ids for r in batch],
            [r.spec for r in batch],
            pad_token_id=self.pad_token_id,
            generator=self.generator,
            should_abort=lambda: self._abort,
            row_keys=self._row_keys(batch),
            # every forward has the same shape, so a request's log-probs do not depend on which
            # requests it was batched with (see generate_batch)
            pad_to=self.config.prompt_length,
            chunk_rows=self.options["deterministic_chunk_rows"],
        )
        self.stats["batches"] += 1
        self.stats["sequences"] += len(batch)
        self.stats["new_tokens"] += sum(len(g.token_ids) for g in generations)
        return [
            TokenOutput(
                token_ids=g.token_ids,
                log_probs=g.log_probs if r.want_log_probs else None,
                stop_reason="aborted" if g.finish_reason == "abort" else "completed",
                extra_fields=self._extra(),
            )
            for r, g in zip(batch, generations, strict=True)
        ]

    # ------------------------------------------------------------------ weights

    async def receive_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Stage one bucket of new weights (applied by `commit_weights`)."""
        params = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"{BACKEND} rollout: trainer sent weight {name!r}, which the rollout model does not have")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"{BACKEND} rollout: weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                )
            self._staged_weights[name] = tensor

    async def commit_weights(self, global_steps: int | None = None) -> int:
        """Copy the staged weights into the model between batches; returns how many were loaded."""
        self._ensure_worker()
        staged, self._staged_weights = self._staged_weights, {}
        async with self._engine_lock:
            params = self.model.state_dict()
            with torch.no_grad():
                for name, tensor in staged.items():
                    params[name].copy_(tensor)
        if global_steps is not None:
            self._set_version(global_steps)
        self.stats["weight_updates"] += 1
        return len(staged)

    async def set_global_steps(self, global_steps: int) -> None:
        self._set_version(global_steps)

    def _set_version(self, global_steps: int) -> None:
        """The weights' version; a new one restarts the request counts (see `_stream_id`)."""
        if global_steps != self.global_steps:
            self.global_steps = global_steps
            self._request_counts.clear()

    def get_stats(self) -> dict:
        return dict(self.stats)

    # ------------------------------------------------------------------ verl's control calls

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Nothing is offloaded on cpu: the model stays resident."""

    async def sleep(self) -> None:
        """Nothing to free on cpu (the KV cache lives only inside a batch)."""

    async def clear_kv_cache(self) -> None:
        """The KV cache is per batch; nothing persists between batches."""

    async def release_kv_cache(self) -> None:
        """See `clear_kv_cache`."""

    async def resume_kv_cache(self) -> None:
        """See `clear_kv_cache`."""

    async def wait_for_requests_to_drain(self) -> None:
        self._ensure_worker()
        while self._queue or self._engine_lock.locked():
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reject_request: bool = False, **kwargs) -> dict[str, Any]:
        """End the running batch early and answer every queued request with stop_reason 'aborted'."""
        self._ensure_worker()
        self._rejecting = reject_request
        queued, self._queue = self._queue, []
        for request in queued:
            request.future.set_result(
                TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted", extra_fields=self._extra())
            )
        self._abort = True
        async with self._engine_lock:  # wait for the running batch to stop
            self._abort = False
        return {"aborted_count": len(queued), "request_ids": []}

    async def resume_generation(self) -> None:
        self._rejecting = False

    async def start_profile(self, **kwargs) -> None:
        """Profiling is not supported by this backend."""

    async def stop_profile(self) -> None:
        """Profiling is not supported by this backend."""


class HFReplica(RolloutReplica):
    """Rollout replica of the `hf_reproducible` backend: one `HFRolloutServer` actor per node."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.nnodes != 1:
            raise ValueError(
                f"{BACKEND} rollout: a replica must fit one node (tensor*data*pipeline parallel = {self.world_size} > "
                f"n_gpus_per_node {self.gpus_per_node}); set actor_rollout_ref.rollout.tensor_model_parallel_size=1"
            )

    def _actor_name(self) -> str:
        role = "reward_" if self.is_reward_model else "teacher_" if self.is_teacher_model else ""
        return f"{BACKEND}_server_{role}{self.replica_rank}_0{self.name_suffix}"

    async def launch_servers(self):
        """Start the server actor next to this replica's first worker (same node)."""
        node_id = None
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        options: dict[str, Any] = {"name": self._actor_name(), "max_concurrency": self.max_concurrency, "num_cpus": 0}
        if node_id is not None:
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        server = (
            ray.remote(HFRolloutServer)
            .options(**options)
            .remote(
                config=self.config,
                model_config=self.model_config,
                rollout_mode=self.rollout_mode,
                workers=self.workers,
                replica_rank=self.replica_rank,
            )
        )
        await server.get_stats.remote()  # wait until the model is loaded
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{BACKEND}://{self._actor_name()}"


class HFServerAdapter(BaseRollout):
    """Worker-side half of the `hf_reproducible` backend: sends the trainer's weights to the replica's server.

    Every trainer rank iterates the weight generator (gathering FSDP shards is collective);
    the replica's first rank sends the full tensors, in buckets of
    `checkpoint_engine.update_weights_bucket_megabytes`, then commits them.
    """

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size
        world *= self.config.pipeline_model_parallel_size
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.has_server = rank % world == 0
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        """The server never offloads; nothing to resume."""

    async def release(self):
        """The server never offloads; nothing to release."""

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        **kwargs,
    ):
        """Push full weights (wire format `named_tensors`) to the server and commit them."""
        if wire_format != "named_tensors":
            raise ValueError(f"{BACKEND} rollout supports wire_format='named_tensors' only, got {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise ValueError(f"{BACKEND} rollout: LoRA adapters are not supported; set actor_rollout_ref.model.lora.merge=True")
        bucket_bytes = self.config.checkpoint_engine.update_weights_bucket_megabytes << 20
        bucket, size, pending = [], 0, []
        for name, tensor in weights:
            if not self.has_server:
                continue
            tensor = tensor.detach().to("cpu").contiguous().clone()
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                pending.append(self._server_handle().receive_weights.remote(bucket))
                bucket, size = [], 0
        if not self.has_server:
            return
        if bucket:
            pending.append(self._server_handle().receive_weights.remote(bucket))
        await asyncio.gather(*pending)
        await self._server_handle().commit_weights.remote(global_steps)

    def generate_sequences(self, prompts):
        raise NotImplementedError(f"the {BACKEND} rollout serves verl's async agent loop only (rollout.mode=async)")
