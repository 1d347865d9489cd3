"""Real vLLM (the CPU build here, `verl_ext.vllm_cpu`): sampling, log-probs, top-p semantics, pre-Ray checks.

One engine per module (vLLM takes ~30 s to start on a 2-core machine), on the tiny model that
`verl_ext.tiny_assets` builds (head_dim 32, the smallest vLLM's CPU attention accepts).
"""

from __future__ import annotations

import os

import pytest
import torch

from verl_ext import vllm_cpu
from verl_ext.core.prompts import encode_messages
from verl_ext.generation import load_vllm, sample_responses
from verl_ext.tiny_assets import ensure_tiny_assets, prompt_text

if not vllm_cpu.vllm_importable() and os.environ.get("VLLM_CPU") == "0":
    pytest.skip("VLLM_CPU=0: installed without vLLM", allow_module_level=True)

torch.set_num_threads(1)

PROBLEMS = ["3+4", "9-2", "5+5"]


@pytest.fixture(scope="module")
def assets():
    return ensure_tiny_assets()


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.model_dir)


@pytest.fixture(scope="module")
def hf_model(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(assets):
    assert vllm_cpu.installed_vllm().startswith("vLLM "), vllm_cpu.installed_vllm()
    engine = load_vllm(assets.model_dir, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [encode_messages(tokenizer, [{"role": "user", "content": prompt_text(q)}]) for q in PROBLEMS]


def reference_log_probs(model, prompt: list[int], response: list[int], temperature=1.0, top_p=1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each response token from one transformers forward, optionally after
    temperature and nucleus truncation (the smallest most-probable set reaching top_p, renormalised)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].double()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = log_p.exp().sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        log_p = torch.log_softmax(log_p.masked_fill(~keep, -torch.inf), dim=-1)
    return log_p.gather(1, torch.tensor(response)[:, None])[:, 0]


def test_samples_have_the_hf_backends_shape_and_seeded_reruns(llm, hf_model, tokenizer, prompts):
    kwargs = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12, "seed": 5, "show_progress": False}
    out = sample_responses(llm, tokenizer, prompts, 3, backend="vllm", **kwargs)
    hf = sample_responses(hf_model, tokenizer, prompts, 3, backend="hf", **kwargs)
    assert [(g.prompt_index, g.sample_index, g.prompt_ids) for g in out] == [
        (g.prompt_index, g.sample_index, g.prompt_ids) for g in hf
    ]
    eos = set(hf_model.generation_config.eos_token_id)
    for g in out:
        if g.finish_reason == "stop":
            assert g.response_ids[-1] in eos and not eos & set(g.response_ids[:-1])
        else:
            assert g.finish_reason == "length" and len(g.response_ids) == 12
        assert g.response_text == tokenizer.decode(g.response_ids, skip_special_tokens=True)
    again = sample_responses(llm, tokenizer, prompts, 3, backend="vllm", **kwargs)
    assert [g.response_ids for g in again] == [g.response_ids for g in out]
    other = sample_responses(llm, tokenizer, prompts, 3, backend="vllm", **{**kwargs, "seed": 6})
    assert [g.response_ids for g in other] != [g.response_ids for g in out]
    # every prompt has its own seed: the same prompt twice in one call gets different draws
    twins = sample_responses(llm, tokenizer, [prompts[0]] * 2, 4, backend="vllm", **kwargs)
    assert [g.response_ids for g in twins[:4]] != [g.response_ids for g in twins[4:]]


def test_log_probs_equal_transformers_in_float32(llm, hf_model, tokenizer, prompts):
    out = sample_responses(llm, tokenizer, prompts, 4, temperature=1.0, max_new_tokens=12, seed=1,
                           backend="vllm", show_progress=False)
    worst = 0.0
    for g in out:
        ref = reference_log_probs(hf_model, g.prompt_ids, g.response_ids)
        worst = max(worst, float((torch.tensor(g.response_log_probs, dtype=torch.float64) - ref).abs().max()))
    assert worst < 1e-5, worst


def test_top_p_mismatch_is_what_a_gpu_run_sees(assets, hf_model, tokenizer, prompts):
    """Rollout top_p < 1 through verl's vLLM settings (logprobs_mode=processed_logprobs, verl's default):
    vLLM returns log π_S(y) = log π(y) − log Z, the renormalised nucleus; the trainer recomputes
    log π(y) over the full vocabulary (verl's `logprobs_from_logits`). Checked three ways against a
    direct float64 computation from the model's logits: vLLM's returned log-probs, the trainer's
    recomputation, and what our truncated-mass metric and verl's rollout correction derive from them."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask
    from verl.utils.torch_functional import logprobs_from_logits

    from verl_ext.rollout_metrics import nucleus_kept_mass, truncation_metrics

    top_p = 0.7
    llm = load_vllm(assets.model_dir, seed=0, logprobs_mode="processed_logprobs")
    try:
        out = sample_responses(llm, tokenizer, prompts, 6, temperature=1.0, top_p=top_p, max_new_tokens=12, seed=2,
                               backend="vllm", show_progress=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    width = max(len(g.response_ids) for g in out)
    rollout, trainer, direct_full, direct_nucleus = (torch.zeros(len(out), width, dtype=torch.float64) for _ in range(4))
    mask = torch.zeros(len(out), width)
    for row, g in enumerate(out):
        n = len(g.response_ids)
        mask[row, :n] = 1
        rollout[row, :n] = torch.tensor(g.response_log_probs, dtype=torch.float64)
        with torch.no_grad():
            logits = hf_model(torch.tensor([g.prompt_ids + g.response_ids])).logits[0, len(g.prompt_ids) - 1 : -1]
        trainer[row, :n] = logprobs_from_logits(logits, torch.tensor(g.response_ids)).double()
        direct_full[row, :n] = reference_log_probs(hf_model, g.prompt_ids, g.response_ids)
        direct_nucleus[row, :n] = reference_log_probs(hf_model, g.prompt_ids, g.response_ids, top_p=top_p)
    valid = mask.bool()
    assert (rollout - direct_nucleus)[valid].abs().max() < 1e-5  # vLLM: the nucleus law
    assert (trainer - direct_full)[valid].abs().max() < 1e-5  # trainer: the full law
    kept = (direct_full - direct_nucleus).exp()  # Z per token, from the logits alone
    assert (kept[valid] < 1 - 1e-3).any(), "top_p=0.7 should cut mass at some sampled tokens"
    assert (nucleus_kept_mass(trainer, rollout) - kept)[valid].abs().max() < 1e-5
    metrics = truncation_metrics(trainer, rollout, mask)
    assert abs(metrics["rollout/top_p_truncated_mass_mean"] - float((1 - kept)[valid].mean())) < 1e-5
    # verl's rollout correction: token-level IS weights π_old / π_rollout = Z (threshold above 1: no clamping)
    weights, _, _ = compute_rollout_correction_and_rejection_mask(
        trainer.float(), rollout.float(), mask, rollout_is="token", rollout_is_threshold=2.0
    )
    assert (weights.batch["rollout_is_weights"].double() - kept)[valid].abs().max() < 1e-4


def test_rollout_settings_that_fail_on_cpu_are_named_before_ray(assets, tmp_path):
    import json

    from verl_ext.vllm_cpu import rollout_problems

    ok = {"name": "vllm", "enable_sleep_mode": False, "full_determinism": False}
    assert rollout_problems(ok, str(assets.model_dir), on_cpu=True) == []
    problems = rollout_problems({"name": "vllm"}, str(assets.model_dir), on_cpu=True)
    assert problems == ["actor_rollout_ref.rollout.enable_sleep_mode=true: vLLM refuses sleep mode on CPU; set it to false"]
    assert "batch-invariant" in rollout_problems({**ok, "full_determinism": True}, str(assets.model_dir), on_cpu=True)[0]
    config = json.loads((assets.model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "num_key_value_heads": 2}))
    (problem,) = rollout_problems(ok, str(tmp_path), on_cpu=True)
    assert "has head_dim 16, which vLLM's CPU attention does not support (supported: 32, 64" in problem
    needs = (
        "actor_rollout_ref.rollout.name=hf_reproducible needs actor_rollout_ref.rollout.full_determinism=true "
        "(what makes reruns identical)"
    )
    assert rollout_problems({"name": "hf_reproducible"}, str(assets.model_dir), on_cpu=True) == [needs]
    assert rollout_problems({"name": "hf_reproducible", "full_determinism": True}, str(assets.model_dir), on_cpu=True) == []
    # a GPU run (composed here, e.g. DRY_RUN=1 of a GPU preset): the CPU build's limits do not apply
    assert rollout_problems({"name": "vllm", "full_determinism": True}, str(tmp_path), on_cpu=False) == []


# ----------------------------------------------------------------------------- the commands, as a user runs them


def _run_script(script: str, *overrides: str, timeout: float = 600):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "", "WANDB_API_KEY": ""}
    proc = subprocess.run(["bash", str(repo / "scripts" / script), *overrides], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_evaluate_samples_with_vllm_by_default(assets, tmp_path):
    """`scripts/evaluate.sh` with model.backend=auto (the default) samples with vLLM's CPU build: n seeded
    samples per problem in the hf backend's record shape; the same seed gives the same responses."""
    import json

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = _run_script(
            "evaluate.sh", f"model.path={assets.model_dir}", f"data.files=[{assets.val_parquet}]", "data.max_problems=5",
            "sampling.n=3", "sampling.max_new_tokens=10", "sampling.seed=4", "metrics.pass_ks=[1,3]",
            f"output_dir={out}", "show_progress=false", "grader.num_workers=1",
        )
        assert "vllm" in (proc.stdout + proc.stderr).lower()
        runs.append([json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()])
    gens = runs[0]
    assert len(gens) == 5 * 3
    prompt_ids = {g["prompt_id"] for g in gens}
    assert len(prompt_ids) == 5
    assert sorted((g["prompt_id"], g["sample_index"]) for g in gens) == sorted((p, s) for p in prompt_ids for s in range(3))
    assert all(1 <= g["response_length"] <= 10 and g["finish_reason"] in ("stop", "length") for g in gens)
    assert len({g["response"] for g in gens}) > 1, "seeded samples should differ across prompts/samples"
    assert [g["response"] for g in runs[1]] == [g["response"] for g in gens]


def test_analysis_samples_with_vllm(tmp_path):
    """The Δlog p analysis with sampling.backend=vllm, end to end on the tiny default pair."""
    import json

    import pyarrow.parquet as pq

    out = tmp_path / "analysis"
    _run_script("analyze_logp_diff.sh", "sampling.backend=vllm", "input.max_prompts=4", "sampling.n=2",
                "sampling.max_new_tokens=8", f"output_dir={out}", "show_progress=false")
    for generator in ("base", "rl"):
        table = pq.read_table(out / "generations" / generator).to_pylist()
        assert len(table) == 8 and all(1 <= len(r["response_ids"]) <= 8 for r in table)
    summary = json.loads((out / "summary.json").read_text())["generators"]
    assert {g: s["responses"] for g, s in summary.items()} == {"base": 8, "rl": 8}
    tokens = pq.read_table(out / "tokens").num_rows
    assert tokens == sum(s["tokens"] for s in summary.values()) > 0
    assert all(s["metrics"]["delta_logp"]["non_finite"] == 0 for s in summary.values())
