"""The cpu platform and the batched `hf` rollout backend (verl_ext.cpu), on the tiny model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from verl_ext.core import rng
from verl_ext.core.distributions import sampling_log_softmax
from verl_ext.cpu.hf_generate import SamplingSpec, generate_batch, sampling_spec_from
from verl_ext.cpu.platform import PlatformCPU, dedupe_backend
from verl_ext.tiny_assets import ensure_tiny_assets, prompt_text


@pytest.fixture(scope="module")
def assets():
    return ensure_tiny_assets()


@pytest.fixture(scope="module")
def model_and_tokenizer(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(assets.tokenizer_dir)


def chat_prompts(tokenizer, expressions):
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(e)}], add_generation_prompt=True, tokenize=False
        )
        for e in expressions
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


EXPRESSIONS = ["3+4", "9-2", "7+7", "0-5", "1+8", "6-6"]


def teacher_forced_logits(model, prompt, tokens):
    """Logits that predicted each of `tokens` after `prompt`, from one forward of the full sequence."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


# ---------------------------------------------------------------------------- platform


def test_dedupe_backend_drops_the_repeated_device_only():
    assert dedupe_backend("cpu:gloo,cpu:gloo") == "cpu:gloo"
    assert dedupe_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    assert dedupe_backend("gloo") == "gloo"
    assert dedupe_backend(None) is None


def test_cpu_platform_answers_like_a_device():
    platform = PlatformCPU()
    assert platform.device_name == "cpu"
    assert platform.communication_backend_name() == "gloo"
    assert platform.ray_resource_name() == "GPU"
    assert platform.current_device() == torch.device("cpu")
    assert not platform.is_platform_available(use_smi_check=True), "must never be auto-detected"
    module = platform.device_module
    module.empty_cache()
    module.synchronize()
    free, total = module.mem_get_info()
    assert 0 < free <= total
    assert module.memory_allocated() == 0


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("first_import", ["verl", "verl_ext.cpu.rollout"])
def test_verl_selects_cpu_platform_and_inits_gloo_with_its_duplicate_backend(tmp_path, first_import):
    """With VERL_PLATFORM=cpu, importing verl (entry-point plugin) or our package first gives the cpu
    platform with every plugin loaded, and verl's own process-group init, whose backend string
    names cpu twice, succeeds."""
    result = _run_python(
        f"""
        import logging, os
        logging.basicConfig(level=logging.DEBUG)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DIST_INIT_METHOD="file://{tmp_path}/pg")
        import {first_import}
        import torch
        from verl.utils.device import get_device_name, get_nccl_backend
        from verl.utils.distributed import initialize_global_process_group_ray
        assert get_device_name() == "cpu" and get_nccl_backend() == "gloo", (get_device_name(), get_nccl_backend())
        initialize_global_process_group_ray()
        t = torch.ones(3)
        torch.distributed.all_reduce(t)
        print("OK", torch.distributed.get_backend(), t.tolist())
        """,
        VERL_PLATFORM="cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK cpu:gloo [1.0, 1.0, 1.0]" in result.stdout
    assert "Failed to load plugin" not in result.stderr, result.stderr[-3000:]


def test_without_verl_platform_nothing_is_wrapped():
    """GPU machines (no VERL_PLATFORM) keep torch's own init_process_group and verl's default platform."""
    result = _run_python(
        """
        import verl, torch.distributed as dist
        from verl.plugin.platform import PlatformRegistry
        assert "cpu" in PlatformRegistry.registered_names()
        assert not getattr(dist.init_process_group, "_verl_ext_dedupe_backend", False)
        from verl.utils.device import get_device_name
        print("DEVICE", get_device_name())
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEVICE cuda" in result.stdout


# ---------------------------------------------------------------------------- sampling math


def test_sampling_spec_reads_vllm_params_and_rejects_unsupported_ones():
    spec = sampling_spec_from(
        {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.0, "logprobs": True},
        default_max_tokens=16,
        eos_token_ids=[7],
        max_possible_tokens=10,
    )
    assert (spec.temperature, spec.top_p, spec.top_k, spec.max_tokens, spec.stop_token_ids) == (0.7, 0.9, 5, 10, (7,))
    assert sampling_spec_from({"ignore_eos": True}, 4, [7]).stop_token_ids == ()
    with pytest.raises(ValueError, match="repetition_penalty"):
        sampling_spec_from({"repetition_penalty": 1.2}, 4, [7])
    with pytest.raises(ValueError, match="beam_width"):
        sampling_spec_from({"beam_width": 4}, 4, [7])
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec(max_tokens=4, top_p=0.0)


# ---------------------------------------------------------------------------- batched generation


def test_batch_generation_shapes_and_stops(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS)
    eos = [tokenizer.eos_token_id]
    spec = SamplingSpec(max_tokens=12, stop_token_ids=tuple(eos))
    keys = rng.sequence_keys(0, torch.arange(len(prompts)))
    outs = generate_batch(model, prompts, spec, tokenizer.pad_token_id, keys)
    short = generate_batch(model, prompts[:1], SamplingSpec(max_tokens=3, stop_token_ids=(-1,)), 0, keys[:1])[0]
    assert len(outs) == len(prompts)
    assert len(short.token_ids) == 3 and short.finish_reason == "length"
    for out in outs:
        assert len(out.token_ids) == len(out.log_probs) <= spec.max_tokens
        assert all(lp <= 0 for lp in out.log_probs)
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in eos and eos[0] not in out.token_ids[:-1]
        else:
            assert len(out.token_ids) == spec.max_tokens
    assert any(o.finish_reason == "stop" for o in outs), "the fine-tuned model should end its answers"


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.3, 5, 1.0), (1.0, -1, 0.8), (0.8, 20, 0.9)]
)
def test_log_probs_match_teacher_forced_recomputation(model_and_tokenizer, temperature, top_k, top_p):
    """Returned log-probs == log softmax(mask_{k,p}(z/T)) of a fresh full-sequence forward pass."""
    model, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS)
    spec = SamplingSpec(max_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p)
    outs = generate_batch(model, prompts, spec, tokenizer.pad_token_id, rng.sequence_keys(1, torch.arange(len(prompts))))
    max_dp = 0.0
    for prompt, out in zip(prompts, outs):
        logits = teacher_forced_logits(model, prompt, out.token_ids)
        ref = sampling_log_softmax(logits, temperature, top_k, top_p).gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert torch.isfinite(ref).all(), "a sampled token lies outside the top-k/top-p set"
        max_dp = max(max_dp, (ref.exp() - torch.tensor(out.log_probs).exp()).abs().max().item())
    assert max_dp < 1e-4


def test_top_k_one_and_temperature_zero_are_greedy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS)
    eos = (tokenizer.eos_token_id,)
    greedy = generate_batch(model, prompts, SamplingSpec(8, temperature=0, stop_token_ids=eos), 0, rng.sequence_keys(2, torch.arange(6)))
    top1 = generate_batch(
        model, prompts, SamplingSpec(8, temperature=1.5, top_k=1, stop_token_ids=eos), 0, rng.sequence_keys(3, torch.arange(6))
    )
    assert [g.token_ids for g in greedy] == [t.token_ids for t in top1]
    assert all(lp == 0.0 for g in greedy for lp in g.log_probs), "a point mass has log-prob 0"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    ref = model.generate(**batch, do_sample=False, max_new_tokens=8, eos_token_id=list(eos), pad_token_id=0)
    for row, g in enumerate(greedy):
        assert ref[row, batch["input_ids"].shape[1] :].tolist()[: len(g.token_ids)] == g.token_ids


def test_temperature_changes_the_spread_of_samples(model_and_tokenizer):
    """Higher temperature -> more distinct answers for the same prompt (statistical, fixed seed)."""
    model, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, ["3+4"]) * 32

    def distinct(t):
        outs = generate_batch(model, prompts, SamplingSpec(8, temperature=t), 0, rng.sequence_keys(5, torch.arange(32)))
        return len({tuple(o.token_ids) for o in outs})

    assert distinct(0.2) < distinct(2.0)


def test_row_keyed_sampling_is_independent_of_batch_and_order(model_and_tokenizer):
    """With row_keys, a row draws the same tokens alone, in a batch, or in another order."""
    model, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS)
    keys = rng.sequence_keys(7, torch.arange(len(prompts)))
    spec = SamplingSpec(10, temperature=1.2, top_p=0.9)
    together = generate_batch(model, prompts, spec, 0, row_keys=keys)
    order = list(reversed(range(len(prompts))))
    reversed_ = generate_batch(model, [prompts[i] for i in order], spec, 0, row_keys=keys[order])
    alone = [generate_batch(model, [p], spec, 0, row_keys=keys[i : i + 1])[0] for i, p in enumerate(prompts)]
    tokens = [g.token_ids for g in together]
    assert [reversed_[order.index(i)].token_ids for i in range(len(prompts))] == tokens
    assert [g.token_ids for g in alone] == tokens
    other = generate_batch(model, prompts, spec, 0, row_keys=rng.sequence_keys(8, torch.arange(6)))
    assert [g.token_ids for g in other] != tokens, "another seed must draw other tokens"
    with pytest.raises(ValueError, match="one key per prompt"):
        generate_batch(model, prompts, spec, 0, row_keys=keys[:2])


def test_fixed_forward_shape_makes_log_probs_independent_of_the_batch(model_and_tokenizer, assets, request):
    """pad_to + chunk_rows + eager attention (what the rollout uses with full_determinism): a row's
    log-probs, not only its tokens, are bit-identical alone and in batches of other sizes and prompt
    lengths, with two threads; without a fixed shape the last bits move."""
    from transformers import AutoModelForCausalLM

    _, tokenizer = model_and_tokenizer
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32, attn_implementation="eager")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # multi-threaded SDPA decoding is what is not batch-invariant
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    prompts = [*chat_prompts(tokenizer, EXPRESSIONS), *chat_prompts(tokenizer, ["1+2+3+4+5+6+7+8+9+10+11+12"])]
    n = len(prompts)
    keys = rng.sequence_keys(3, torch.arange(n))
    spec = SamplingSpec(10, temperature=1.0)

    def log_probs(rows, **shape):
        outs = generate_batch(model, [prompts[i] for i in rows], spec, 0, row_keys=keys[rows], **shape)
        return {i: g.log_probs for i, g in zip(rows, outs, strict=True)}

    fixed = {"pad_to": max(map(len, prompts)) + 3, "chunk_rows": 3}
    alone = {i: log_probs([i], **fixed)[i] for i in range(n)}
    for rows in (list(range(n)), list(range(n))[::-1], [n - 1, 0, 2], [1, 4]):
        assert log_probs(rows, **fixed) == {i: alone[i] for i in rows}, rows
    free_alone = {i: log_probs([i])[i] for i in range(n)}
    free_batched = log_probs(list(range(n)))
    assert free_batched != free_alone, "the forward's shape should matter without pad_to/chunk_rows"
    assert [g.token_ids for g in generate_batch(model, prompts, spec, 0, row_keys=keys, **fixed)] == [
        g.token_ids for g in generate_batch(model, prompts, spec, 0, row_keys=keys)
    ], "same draws, only the last bits of the log-probs move"


def test_row_keyed_sampling_follows_the_sampling_distribution(model_and_tokenizer):
    """Frequencies of the first token over 4000 keyed rows match exp(sampling log-probs) (chi-square)."""
    from scipy.stats import chisquare

    model, tokenizer = model_and_tokenizer
    prompt = chat_prompts(tokenizer, ["3+4"])[0]
    spec = SamplingSpec(1, temperature=1.5)
    n = 4000
    outs = generate_batch(model, [prompt] * n, spec, 0, row_keys=rng.sequence_keys(0, torch.arange(n)))
    logits = teacher_forced_logits(model, prompt, [0])[:1]
    probs = (logits[0] / 1.5).softmax(-1).double()
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=probs.numel()).double()
    common = probs * n >= 5  # chi-square needs expected counts >= 5; pool the rest
    observed = torch.cat([counts[common], counts[~common].sum()[None]])
    expected = torch.cat([probs[common], probs[~common].sum()[None]]) * n
    assert chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue > 1e-3


def test_stable_stream_ids_do_not_depend_on_the_process():
    from verl_ext.cpu.rollout import stable_stream_id

    code = "from verl_ext.cpu.rollout import stable_stream_id; print(stable_stream_id('det-3#1'))"
    other_process = _run_python(code, PYTHONHASHSEED="123").stdout.strip().splitlines()[-1]
    assert int(other_process) == stable_stream_id("det-3#1")
    assert 0 <= stable_stream_id("det-3#1") < 2**63 and stable_stream_id("det-3#1") != stable_stream_id("det-3#2")


def test_abort_ends_unfinished_rows(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS[:2])
    calls = []
    outs = generate_batch(
        model, prompts, SamplingSpec(10), 0, rng.sequence_keys(0, torch.arange(2)),
        should_abort=lambda: calls.append(1) or len(calls) >= 2,
    )
    assert [o.finish_reason for o in outs] == ["abort", "abort"]
    assert [len(o.token_ids) for o in outs] == [2, 2]


# ---------------------------------------------------------------------------- the Ray server


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _rollout_config(**overrides):
    from verl.workers.config import RolloutConfig

    values = {
        "name": "hf_reproducible",
        "full_determinism": True,
        "tensor_model_parallel_size": 1,
        "prompt_length": 32,
        "response_length": 8,
        "dtype": "float32",
        "load_format": "auto",
        "max_num_seqs": 64,
    }
    values.update(overrides)
    return RolloutConfig(**values)


@pytest.fixture(scope="module")
def server(ray_cluster, assets):
    actor = _start_server(ray_cluster, assets, "")
    yield actor
    ray_cluster.kill(actor)


def _generate_all(ray, server, prompts, params):
    refs = [
        server.generate.remote(prompt_ids=p, sampling_params=dict(params), request_id=str(i))
        for i, p in enumerate(prompts)
    ]
    return ray.get(refs)


def test_server_batches_concurrent_requests(ray_cluster, server, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS) * 4  # 24 requests sent at once
    before = ray_cluster.get(server.get_stats.remote())
    outs = _generate_all(
        ray_cluster, server, prompts, {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}
    )
    after = ray_cluster.get(server.get_stats.remote())
    assert after["sequences"] - before["sequences"] == 24
    assert after["batches"] - before["batches"] <= 3, (
        f"24 concurrent requests ran in {after['batches'] - before['batches']} batches"
    )
    for out in outs:
        assert 1 <= len(out.token_ids) <= 8 and len(out.log_probs) == len(out.token_ids)
        assert out.stop_reason == "completed"
    no_lp = _generate_all(ray_cluster, server, prompts[:2], {"temperature": 1.0, "logprobs": False})
    assert all(o.log_probs is None for o in no_lp)


def _start_server(ray, assets, name_suffix: str, **config):
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.replica import RolloutMode

    from verl_ext.cpu.rollout import HFRolloutServer, server_actor_name

    actor = (
        ray.remote(HFRolloutServer)
        .options(name=server_actor_name(0, suffix=name_suffix), max_concurrency=1000, num_cpus=0)
        .remote(
            config=_rollout_config(**config),
            model_config=HFModelConfig(path=str(assets.model_dir)),
            rollout_mode=RolloutMode.HYBRID,
            workers=[],
            replica_rank=0,
        )
    )
    ray.get(actor.get_stats.remote())
    return actor


def test_every_request_gets_its_own_stream(ray_cluster, assets, model_and_tokenizer):
    """A fresh server given the requests in another order, in other batches,
    returns the same tokens per request; the second time a request comes it gets a new stream. Both
    id schemes of verl: "det-<row>" (synchronous agent loop) and "det-0" for every request (the v1
    trainer's TransferQueue loop passes no row), where the prompt tells requests apart and identical
    requests (n samples of a prompt) give the same multiset of responses."""
    _, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS) * 2
    params = {"temperature": 1.0, "top_p": 1.0, "logprobs": True}

    def run(order, suffix, ids):
        server = _start_server(ray_cluster, assets, suffix, seed=3)
        try:
            outs = {}
            for _ in range(2):  # two "steps": every request comes twice
                refs = {
                    i: server.generate.remote(prompt_ids=prompts[i], sampling_params=params, request_id=ids[i])
                    for i in order
                }
                outs.setdefault(
                    "first" if not outs else "second", {i: ray_cluster.get(r).token_ids for i, r in refs.items()}
                )
            return outs
        finally:
            ray_cluster.kill(server)

    rows = [f"det-{i}" for i in range(len(prompts))]
    forward = run(list(range(len(prompts))), "-det-a", rows)
    backward = run(list(reversed(range(len(prompts)))), "-det-b", rows)
    assert forward == backward
    assert forward["first"] != forward["second"], "a repeated request must not reuse its random stream"
    # the same prompt under different ids (rows 0 and 6) samples independently
    assert [forward["first"][i] for i in range(6)] != [forward["first"][i + 6] for i in range(6)]

    same_id = ["det-0"] * len(prompts)
    v1_forward = run(list(range(len(prompts))), "-det-c", same_id)
    v1_backward = run([*range(6, 12), *reversed(range(6))], "-det-d", same_id)
    for step in ("first", "second"):
        for i in range(6):  # prompt i is rows i and i + 6: a group of two identical requests
            groups = [sorted([outs[step][i], outs[step][i + 6]]) for outs in (v1_forward, v1_backward)]
            assert groups[0] == groups[1], (step, i)
    assert any(v1_forward["first"][i] != v1_forward["first"][i + 6] for i in range(6)), "identical requests, one stream"
    assert v1_forward["first"] != v1_forward["second"]


def test_adapter_pushes_new_weights_and_generation_changes(
    ray_cluster, server, assets, model_and_tokenizer, monkeypatch
):
    """HFServerAdapter.update_weights (what verl calls after each step) changes what the server generates."""
    from verl.workers.config import HFModelConfig

    from verl_ext.cpu.rollout import HFServerAdapter

    model, tokenizer = model_and_tokenizer
    prompts = chat_prompts(tokenizer, EXPRESSIONS)
    greedy = {"temperature": 0, "logprobs": True}
    before = [o.token_ids for o in _generate_all(ray_cluster, server, prompts, greedy)]

    monkeypatch.setenv("RANK", "0")
    adapter = HFServerAdapter(
        config=_rollout_config(), model_config=HFModelConfig(path=str(assets.model_dir)), device_mesh=None
    )
    generator = torch.Generator().manual_seed(0)
    new_weights = {n: t + 0.5 * torch.randn(t.shape, generator=generator) for n, t in model.state_dict().items()}
    asyncio.run(adapter.update_weights(iter(new_weights.items()), global_steps=7))

    after = _generate_all(ray_cluster, server, prompts, greedy)
    assert [o.token_ids for o in after] != before
    assert all(o.extra_fields["global_steps"] == 7 for o in after)
    # the server now holds exactly the pushed weights: its log-probs match the pushed model
    pushed = type(model)(model.config).eval()
    pushed.load_state_dict(new_weights)
    sampled = _generate_all(ray_cluster, server, prompts, {"temperature": 1.0, "logprobs": True})
    for prompt, out in zip(prompts, sampled):
        ref = torch.log_softmax(teacher_forced_logits(pushed, prompt, out.token_ids), -1)
        ref = ref.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert (ref.exp() - torch.tensor(out.log_probs).exp()).abs().max() < 1e-4


def test_server_rejects_unknown_weights(ray_cluster, server):
    with pytest.raises(Exception, match="not_a_weight"):
        ray_cluster.get(server.receive_weights.remote([("not_a_weight", torch.zeros(1))]))


def test_hf_reproducible_backend_is_registered_with_verl():
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_ext.cpu.rollout import HFReplica, HFServerAdapter

    assert RolloutReplicaRegistry.get("hf_reproducible") is HFReplica
    assert get_rollout_class("hf_reproducible", "async") is HFServerAdapter


def test_request_streams_restart_with_each_weight_version():
    """A run resumed from step N (a fresh server whose first weight push is version N) gives its
    requests the streams the uninterrupted run gave them after its own version-N push."""
    from collections import Counter

    from verl_ext.cpu.rollout import HFRolloutServer

    def server():
        s = object.__new__(HFRolloutServer)
        s._request_counts, s.global_steps = Counter(), None
        return s

    def draws(s, version):
        s._set_version(version)
        return [s._stream_id("det-0", [5, 6], "spec"), s._stream_id("det-0", [5, 6], "spec"), s._stream_id("det-0", [7], "spec")]

    uninterrupted = server()
    at_0, at_1 = draws(uninterrupted, 0), draws(uninterrupted, 1)
    resumed = server()
    assert draws(resumed, 1) == at_1
    assert len(set(at_0 + at_1)) == 6  # every request of every version its own stream
