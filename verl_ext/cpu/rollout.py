"""verl rollout backend `hf_reproducible`: transformers generation whose reruns are bit-identical.

Training runs verl's own `vllm` rollout everywhere (on a machine without a GPU, vLLM's CPU build:
`verl_ext/vllm_cpu.py`). vLLM has no batch-invariant mode on CPU, so two CPU runs with the same
seed differ. This opt-in backend is for the runs that must not:
`actor_rollout_ref.rollout.name=hf_reproducible actor_rollout_ref.rollout.full_determinism=true`
(full_determinism also makes the trainer's batches timing-independent: `verl_ext.trainer`).

- `HFRolloutServer` (a Ray actor per replica) queues verl's token-in/token-out requests and runs
  them in batches (`hf_generate.generate_batch`): a batch starts when requests stop arriving for
  `BATCH_IDLE_S` (at most `BATCH_WAIT_S`, at most `rollout.max_num_seqs` requests).
- `HFReplica` starts the servers; `HFServerAdapter` (worker side) pushes the trainer's weights to
  its server after every step, which swaps them in between batches.

Why reruns are identical: every request samples from its own random stream, keyed by the weights'
version, verl's request id, the prompt and the sampling parameters (`_stream_id`), so a rerun, or a
run resumed from a checkpoint, draws the same responses whatever order requests arrive and batch
in; every forward has one shape (width `rollout.prompt_length`, `CHUNK_ROWS` rows) and eager
attention (multi-threaded SDPA decoding on CPU depends on the other rows), so the log-probs, not
only the tokens, are bit-identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Generator
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.torch_dtypes import PrecisionType
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from verl_ext.core import rng
from verl_ext.core.models import eos_token_ids
from verl_ext.cpu.hf_generate import generate_batch, sampling_spec_from

logger = logging.getLogger(__name__)

BACKEND = "hf_reproducible"
BATCH_IDLE_S = 0.02  # a batch starts once no request arrived for this long...
BATCH_WAIT_S = 0.5  # ...or this long after its first request
CHUNK_ROWS = 16  # rows per forward: fixed, so that a row's log-probs do not depend on its batch


def stable_stream_id(name: str) -> int:
    """A 63-bit id from a string (blake2b): unlike hash(), the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def server_actor_name(replica_rank: int, node_rank: int = 0, suffix: str = "") -> str:
    """Ray actor name of a replica's server (the adapter finds it by this name)."""
    return f"{BACKEND}_server_{replica_rank}_{node_rank}{suffix}"


def load_rollout_model(model_config: HFModelConfig, dtype: str, load_format: str):
    """The generation model with eager attention (batch-invariant on CPU): real weights, or random
    ones for `load_format=dummy*` (the trainer pushes its weights before the first rollout)."""
    from transformers import AutoModelForCausalLM

    path = model_config.local_path
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"actor_rollout_ref.model.path: model directory {path!r} does not exist")
    kwargs = {"dtype": PrecisionType.to_dtype(dtype), "attn_implementation": "eager",
              "trust_remote_code": model_config.trust_remote_code}
    if load_format.startswith("dummy"):
        return AutoModelForCausalLM.from_config(model_config.hf_config, **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


class _Request:
    __slots__ = ("future", "prompt_ids", "spec", "stream_id", "want_log_probs")

    def __init__(self, prompt_ids, spec, want_log_probs, stream_id):
        self.prompt_ids, self.spec, self.want_log_probs, self.stream_id = prompt_ids, spec, want_log_probs, stream_id
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
        self.replica_rank = replica_rank
        torch.set_num_threads(os.cpu_count() or 1)  # rollout and training alternate: use every core
        self.model = load_rollout_model(self.model_config, self.config.dtype, self.config.load_format)
        tokenizer = self.model_config.tokenizer
        self.eos_token_ids = [] if self.config.ignore_eos else eos_token_ids(self.model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids or [0])[0]
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

    def _ensure_worker(self) -> None:
        """Start the batching loop on the actor's event loop (first call only)."""
        if self._worker_task is None:
            self._queue_changed = asyncio.Event()
            self._engine_lock = asyncio.Lock()
            self._worker_task = asyncio.get_running_loop().create_task(self._batch_loop())

    # ------------------------------------------------------------------ generation

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
        cfg, n = self.config, len(prompt_ids)
        room = (cfg.max_model_len or self.model_config.hf_config.max_position_embeddings) - n
        if room < 1:
            raise ValueError(f"prompt of {n} tokens leaves no room to generate within {n + room} positions")
        spec = sampling_spec_from(
            sampling_params,
            # verl's rule: at most response_length, within prompt_length + response_length in total
            default_max_tokens=max(1, min(cfg.response_length, cfg.prompt_length + cfg.response_length - n)),
            eos_token_ids=self.eos_token_ids,
            max_possible_tokens=room,
        )
        request = _Request(prompt_ids, spec, bool(sampling_params.get("logprobs")), self._stream_id(request_id, prompt_ids, spec))
        self._queue.append(request)
        self._queue_changed.set()
        return await request.future

    def _stream_id(self, request_id: str, prompt_ids: list[int], spec) -> int:
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
        deadline = time.monotonic() + BATCH_WAIT_S
        while len(self._queue) < self.config.max_num_seqs and time.monotonic() < deadline:
            seen = len(self._queue)
            await asyncio.sleep(BATCH_IDLE_S)
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
                    results = [err] * len(batch)
            for request, result in zip(batch, results, strict=True):
                if request.future.done():
                    continue
                if isinstance(result, Exception):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)

    def _run_batch(self, batch: list[_Request]) -> list[TokenOutput]:
        """One `generate_batch` per distinct sampling spec (training sends one; validation another)."""
        by_spec: dict[Any, list[int]] = defaultdict(list)
        for i, request in enumerate(batch):
            by_spec[request.spec].append(i)
        outputs: list[TokenOutput | None] = [None] * len(batch)
        for spec, rows in by_spec.items():
            keys = rng.sequence_keys(self.config.seed + self.replica_rank, torch.tensor([batch[i].stream_id for i in rows]))
            generations = generate_batch(
                self.model, [batch[i].prompt_ids for i in rows], spec, self.pad_token_id, keys,
                pad_to=self.config.prompt_length, chunk_rows=CHUNK_ROWS, should_abort=lambda: self._abort,
            )
            for i, g in zip(rows, generations, strict=True):
                outputs[i] = TokenOutput(
                    token_ids=g.token_ids,
                    log_probs=g.log_probs if batch[i].want_log_probs else None,
                    stop_reason="aborted" if g.finish_reason == "abort" else "completed",
                    extra_fields=self._extra(),
                )
                self.stats["new_tokens"] += len(g.token_ids)
        self.stats["batches"] += 1
        self.stats["sequences"] += len(batch)
        return outputs

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

    # Nothing is offloaded and the KV cache lives only inside a batch: verl's memory calls are no-ops.
    async def wake_up(self, tags: list[str] | None = None) -> None: ...
    async def sleep(self) -> None: ...
    async def clear_kv_cache(self) -> None: ...
    async def release_kv_cache(self) -> None: ...
    async def resume_kv_cache(self) -> None: ...

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

    async def start_profile(self, **kwargs) -> None: ...  # profiling is not supported by this backend
    async def stop_profile(self) -> None: ...


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
