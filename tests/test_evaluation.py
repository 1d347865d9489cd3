"""verl_ext.evaluation: Pass@k / Avg@k against brute force, aggregation, the grade and generate commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from verl_ext.core.paths import config_dir
from verl_ext.evaluation import avg_at_k, mean_avg_at_k, mean_pass_at_k, pass_at_k
from verl_ext.evaluation.report import ProblemResult, aggregate, markdown_table

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- metrics


def brute_force(n: int, c: int, k: int) -> tuple[float, float]:
    """(pass@k, avg@k) by enumerating every k-subset of n responses, the first c of them correct."""
    subsets = list(combinations(range(n), k))
    passed = sum(any(i < c for i in s) for s in subsets) / len(subsets)
    accuracy = sum(sum(i < c for i in s) / k for s in subsets) / len(subsets)
    return passed, accuracy


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_and_avg_at_k_match_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            passed, accuracy = brute_force(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(passed, abs=1e-12), (n, c, k)
            assert avg_at_k(n, c, k) == pytest.approx(accuracy, abs=1e-12), (n, c, k)


def test_metrics_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(32, 0, 16) == 0.0 and pass_at_k(32, 32, 16) == 1.0 and pass_at_k(32, 17, 16) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the accuracy
    assert avg_at_k(32, 8, 32) == 0.25 and avg_at_k(4, 1, 2) == 0.25
    assert mean_pass_at_k([(4, 1), (4, 4)], 2) == pytest.approx((0.5 + 1.0) / 2)
    assert mean_avg_at_k([(4, 1), (2, 2)], 2) == pytest.approx((0.25 + 1.0) / 2)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not. One correct in 1000, k = 500: 1/2.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert pass_at_k(10_000, 10, 1) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((4, 5, 1), ValueError, "c=5"),
        ((4, 1, 5), ValueError, "k=5"),
        ((4, 1, 0), ValueError, "k=0"),
        ((0, 0, 1), ValueError, "n=0"),
        ((4.0, 1, 1), TypeError, "n=4.0"),
    ],
)
def test_metric_arguments_are_checked(args, error, match):
    with pytest.raises(error, match=match):
        pass_at_k(*args)


def test_numpy_and_pandas_counts_are_accepted():
    """Counts taken from pandas are numpy integers; the values equal those from Python ints."""
    import numpy as np
    import pandas as pd

    counts = pd.DataFrame({"n": [8, 8, 4], "c": [3, 0, 4]})
    pairs = list(zip(counts["n"].to_numpy(), counts["c"].to_numpy()))
    for n, c in pairs:
        assert isinstance(n, np.integer)
        for k in (1, 2, 4):
            assert pass_at_k(n, c, np.int32(k)) == pass_at_k(int(n), int(c), k)
            assert avg_at_k(n, c, np.uint8(k)) == avg_at_k(int(n), int(c), k)
    assert mean_pass_at_k(pairs, np.int64(2)) == pytest.approx(
        mean_pass_at_k([(8, 3), (8, 0), (4, 4)], 2))
    with pytest.raises(TypeError, match="k=True"):
        pass_at_k(4, 1, True)
    with pytest.raises(TypeError, match="c=.*1.0.* must be an integer"):
        pass_at_k(4, np.float64(1.0), 1)


def test_aggregate_and_markdown():
    problems = [
        ProblemResult("aime", "0", "5", [True, False, False, False], ["5", "1", "2", "3"], [10, 20, 30, 40]),
        ProblemResult("aime", "1", "7", [True, True, True, True], ["7"] * 4, [10, 10, 10, 10]),
        ProblemResult("amc", "0", "1", [False, False], ["", ""], [5, 7]),
    ]
    table = aggregate(problems, pass_ks=[1, 2], avg_k=None)
    assert table["aime"] == {
        "num_problems": 2, "samples_per_problem": 4, "avg@4": pytest.approx((0.25 + 1) / 2),
        "pass@1": pytest.approx((0.25 + 1) / 2), "pass@2": pytest.approx((0.5 + 1) / 2),
        "mean_response_length": pytest.approx(17.5),  # (10+20+30+40+4*10)/8
    }
    assert table["amc"]["avg@2"] == 0 and table["amc"]["pass@2"] == 0 and table["amc"]["mean_response_length"] == 6
    md = markdown_table(table, "tokens")
    assert "| dataset | problems | samples | Avg@4 | Pass@1 | Pass@2 | Avg@2 | mean length (tokens) |" in md
    assert "| aime | 2 | 4 | 62.50 | 62.50 | 75.00 | - | 17.5 |" in md
    assert "| amc | 1 | 2 | - | 0.00 | 0.00 | 0.00 | 6.0 |" in md
    with pytest.raises(ValueError, match="k=4 is larger than the 2 samples of problem '0' in 'amc'"):
        aggregate(problems, pass_ks=[4], avg_k=None)


# ----------------------------------------------------------------------------- commands


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "", "WANDB_API_KEY": "", "PYTHON": sys.executable}


def test_grade_command_end_to_end(tmp_path):
    """scripts/evaluate.sh on a small jsonl: forms of right answers, wrong ones, no box, mapped columns."""
    rows = []
    answers = {"p0": ("142.0", ["\\boxed{142}", "\\boxed{141}", "no answer", "\\boxed{\\frac{284}{2}}"]),
               "p1": ("\\frac{1}{2}", ["\\boxed{0.5}", "\\boxed{\\dfrac{2}{4}}", "\\boxed{1/2}", "\\boxed{2}"]),
               "p2": ("(1,2]", ["\\boxed{[1,2]}", "\\boxed{9^{9^{9}}}", "x" * 5000, "\\boxed{(1,2)}"])}
    for pid, (truth, responses) in answers.items():
        for s, response in enumerate(responses):
            rows.append({"qid": pid, "text": f"reasoning... {response}", "answer": truth, "data_source": "toy",
                         "sample": s})
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = ["bash", str(REPO / "scripts" / "evaluate.sh"), f"generations={gens}", f"output_dir={out}",
           "columns.prompt_id=qid", "columns.response=text", "columns.ground_truth=answer",
           "metrics.pass_ks=[1,2,4]", "grader.timeout_s=2.0", "grader.num_workers=1", "show_progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())["datasets"]["toy"]
    # per problem correct: p0 2/4, p1 3/4, p2 0/4
    assert result["avg@4"] == pytest.approx((0.5 + 0.75 + 0) / 3)
    assert result["pass@1"] == pytest.approx((0.5 + 0.75 + 0) / 3)
    assert result["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 3, 2)) / 3)
    assert result["pass@4"] == pytest.approx(2 / 3)
    per_problem = [json.loads(line) for line in (out / "per_problem.jsonl").read_text().splitlines()]
    assert {p["prompt_id"]: p["correct"] for p in per_problem} == {
        "p0": [True, False, False, True], "p1": [True, True, True, False], "p2": [False, False, False, False]}
    assert "| toy | 3 | 4 | 41.67 |" in (out / "results.md").read_text()
    assert "mean length (chars)" in (out / "results.md").read_text()
    assert not list(out.glob(".*")), "temporary files left behind"


def test_grade_command_reports_missing_columns(tmp_path):
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"id": 0, "response": "\\boxed{1}", "ground_truth": "1", "data_source": "x"}) + "\n")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "evaluate.sh"), f"generations={gens}", f"output_dir={tmp_path / 'o'}"],
        capture_output=True, text=True, check=False, env=_env(), timeout=120,
    )
    assert proc.returncode != 0
    assert "missing prompt_id (column 'prompt_id')" in proc.stderr and "columns.<key>" in proc.stderr


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name="evaluate", overrides=overrides)


def test_generate_then_grade_on_tiny_model(tmp_path):
    """Generate with the tiny Qwen2 (transformers on CPU) on its arithmetic parquet, then grade."""
    import torch

    from verl_ext.evaluation.command import run
    from verl_ext.tiny_assets import ensure_tiny_assets

    assets = ensure_tiny_assets()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared CPU
    cfg = _compose([
        f"model.path={assets.model_dir}", "model.backend=hf", "model.device=cpu",
        f"data.files=[{assets.val_parquet}]", "data.max_problems=6",
        "sampling.n=4", "sampling.max_new_tokens=12", "sampling.batch_size=24", "sampling.seed=1",
        "metrics.pass_ks=[1,4]", f"output_dir={tmp_path}", "show_progress=false", "grader.num_workers=1",
    ])
    try:
        out = run(cfg)
    finally:
        torch.set_num_threads(threads)
    gens = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 6 * 4 and {g["data_source"] for g in gens} == {"tiny_arith"}
    assert all(1 <= g["response_length"] <= 12 and g["finish_reason"] in ("stop", "length") for g in gens)
    row = out["table"]["tiny_arith"]
    assert row["num_problems"] == 6 and row["samples_per_problem"] == 4
    # independent recount from the written generations
    from verl_ext.reward import is_correct

    per_problem: dict[str, list[bool]] = {}
    for g in gens:
        per_problem.setdefault(g["prompt_id"], []).append(is_correct(g["response"], g["ground_truth"]))
    assert row["avg@4"] == pytest.approx(sum(sum(v) / 4 for v in per_problem.values()) / 6)
    assert row["pass@4"] == pytest.approx(sum(any(v) for v in per_problem.values()) / 6)
    assert 0 < row["avg@4"] < 1, "the tiny model should answer some but not all right"
    assert "mean length (tokens)" in (tmp_path / "results.md").read_text()


def _tiny_generate_cfg(out, *extra):
    from verl_ext.tiny_assets import ensure_tiny_assets

    assets = ensure_tiny_assets()
    return _compose([
        f"model.path={assets.model_dir}", "model.backend=hf", "model.device=cpu",
        f"data.files=[{assets.val_parquet}]", "data.max_problems=5",
        "sampling.n=2", "sampling.max_new_tokens=6", "sampling.batch_size=4", "sampling.seed=3",
        "metrics.pass_ks=[1]", f"output_dir={out}", "show_progress=false", "grader.num_workers=1", *extra,
    ])


def _generations(out) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_generation_in_one_shard_draws_what_unsharded_sampling_draws(tmp_path):
    """shard_problems >= the problems: shard 0 samples with the run's own seed, as before sharding."""
    from transformers import AutoTokenizer

    from verl_ext.core.models import load_hf_model
    from verl_ext.core.prompts import encode_messages
    from verl_ext.evaluation.command import load_problems, run
    from verl_ext.generation import sample_responses

    cfg = _tiny_generate_cfg(tmp_path, "shard_problems=5")
    run(cfg)
    problems = load_problems(list(cfg.data.files), 5)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    gens = sample_responses(load_hf_model(cfg.model.path, "cpu"), tok,
                            [encode_messages(tok, p["messages"], True) for p in problems], 2,
                            temperature=1.0, top_p=0.7, top_k=-1, max_new_tokens=6, seed=3, batch_size=4,
                            show_progress=False)
    assert [g["response"] for g in _generations(tmp_path)] == [g.response_text for g in gens]
    assert [g["prompt_id"] for g in _generations(tmp_path)] == [problems[g.prompt_index]["prompt_id"] for g in gens]
    assert sorted(p.name for p in (tmp_path / "generations").iterdir()) == ["shard-00000.parquet"]


def test_generation_resumes_shard_by_shard_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    """5 problems in shards of 2: an interrupted run keeps its finished shards, the rerun samples only
    the missing one and ends with the uninterrupted run's records; other settings in the same folder
    are refused naming the key; overwrite=true starts over."""
    from verl_ext.evaluation import generate
    from verl_ext.evaluation.command import run
    from verl_ext.jobs import ResumeError

    whole = tmp_path / "whole"
    run(_tiny_generate_cfg(whole, "shard_problems=2"))
    assert sorted(p.name for p in (whole / "generations").iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]
    expected = _generations(whole)
    assert len(expected) == 5 * 2 and len({r["prompt_id"] for r in expected}) == 5

    real, calls, ctrl_c = generate.EvalWorker.generate, [], [True]

    def interrupted(worker, shard):
        calls.append(shard.index)
        if shard.index == 2 and ctrl_c[0]:
            raise KeyboardInterrupt  # Ctrl-C during the last shard
        return real(worker, shard)

    out = tmp_path / "resumed"
    monkeypatch.setattr(generate.EvalWorker, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(_tiny_generate_cfg(out, "shard_problems=2"))
    assert sorted(p.name for p in (out / "generations").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (out / "results.json").exists()
    calls.clear()
    ctrl_c[0] = False
    capsys.readouterr()
    run(_tiny_generate_cfg(out, "shard_problems=2"))
    assert calls == [2], "only the missing shard is sampled again"
    assert "3 shard(s): 1 generated now, 2 reused" in capsys.readouterr().out
    assert _generations(out) == expected

    with pytest.raises(ResumeError, match=r"\(sampling.seed: 3 -> 4\); .*overwrite=true to delete them"):
        run(_tiny_generate_cfg(out, "shard_problems=2", "sampling.seed=4"))
    with pytest.raises(ResumeError, match=r"shard_problems: 2 -> 3"):
        run(_tiny_generate_cfg(out, "shard_problems=3"))
    calls.clear()
    run(_tiny_generate_cfg(out, "shard_problems=3", "overwrite=true"))
    assert calls == [0, 1] and sorted(p.name for p in (out / "generations").iterdir()) == [
        "shard-00000.parquet", "shard-00001.parquet"]
    assert [r["prompt_id"] for r in _generations(out)] == [r["prompt_id"] for r in expected]


def test_generation_on_ray_actors_matches_in_process(tmp_path):
    """ray.enabled=true, 2 CPU actors: the same records as in this process (draws are keyed by shard)."""
    ray = pytest.importorskip("ray")
    from verl_ext.evaluation.command import run

    if ray.is_initialized():
        ray.shutdown()
    run(_tiny_generate_cfg(tmp_path / "local", "shard_problems=2"))
    run(_tiny_generate_cfg(tmp_path / "ray", "shard_problems=2", "ray.enabled=true", "ray.num_workers=2"))
    assert not ray.is_initialized(), "the pool shuts down the Ray runtime it started"
    assert _generations(tmp_path / "ray") == _generations(tmp_path / "local")


def test_generate_checks_k_before_sampling(tmp_path):
    from verl_ext.evaluation.command import EvaluationError, run

    cfg = _compose(["model.path=/nonexistent", "sampling.n=4", "metrics.pass_ks=[16]", f"output_dir={tmp_path}"])
    with pytest.raises(EvaluationError, match=r"metrics k=16 is invalid with sampling.n=4"):
        run(cfg)
    cfg = _compose(["mode=score"])
    with pytest.raises(EvaluationError, match="mode='score' is invalid; valid choices: auto, grade, generate"):
        run(cfg)


def test_grade_logs_to_wandb_in_the_training_project(tmp_path, offline_wandb_runs, read_wandb_history):
    """With WANDB_MODE set (enable=auto) the graded table goes to a real (offline) wandb run in the
    training's project and WANDB_RUN_GROUP: every number as eval/<dataset>/<metric>, and the table."""
    from omegaconf import OmegaConf

    from verl_ext.evaluation import command

    gens = tmp_path / "gens.jsonl"
    rows = [{"prompt_id": p, "response": f"\\boxed{{{r}}}", "ground_truth": "3", "data_source": "toy"}
            for p, answers in (("a", "3313"), ("b", "1200")) for r in answers]
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    started = offline_wandb_runs(command, group="eval-test")
    out = tmp_path / "graded"
    table = command.run(_compose([f"generations={gens}", f"output_dir={out}", "metrics.pass_ks=[1,2]",
                                  "show_progress=false", "grader.num_workers=1"]))["table"]
    assert table["toy"]["avg@4"] == pytest.approx((3 / 4 + 0) / 2)  # "3313" has three 3s, "1200" none
    (run,) = started
    recipe = OmegaConf.load(config_dir() / "dapo_reweight.yaml")
    assert (run.project, run.group, run.name, run.job_type) == (
        recipe.trainer.project_name, "eval-test", "evaluate-graded", "eval")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (row,) = read_wandb_history(run_dir)
    assert {k: v for k, v in row.items() if k.startswith("eval/toy/")} == {
        f"eval/toy/{k}": pytest.approx(v) for k, v in table["toy"].items() if isinstance(v, (int, float))}
    data = json.loads((run_dir / "files" / row["eval/table/path"]).read_text())
    assert data["columns"] == ["dataset", *table["toy"]] and data["data"][0][0] == "toy"


def test_bad_wandb_enable_is_refused_before_grading(tmp_path):
    from verl_ext.evaluation.command import run

    with pytest.raises(ValueError, match="wandb.enable='yes' is invalid; valid choices: auto, true, false"):
        run(_compose([f"generations={tmp_path / 'absent.jsonl'}", f"output_dir={tmp_path / 'o'}",
                      "wandb.enable=yes"]))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- refused before any model loads


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sampling.temperature=nan"], "sampling.temperature=nan is invalid; valid: a number >= 0"),
        (["sampling.top_p=1.5"], "sampling.top_p=1.5 is invalid; valid: a number in (0, 1]"),
        (["sampling.top_p=0"], "sampling.top_p=0 is invalid; valid: a number in (0, 1]"),
        (["sampling.n=0"], "sampling.n=0 is invalid; valid: an integer >= 1"),
        (["sampling.top_k=0"], "sampling.top_k=0 is invalid; valid: -1 (off) or an integer >= 1"),
        (["grader.timeout_s=nan"], "grader.timeout_s=nan is invalid; valid: a number > 0"),
        (["grader.num_workers=0"], "grader.num_workers=0 is invalid; valid: an integer >= 1"),
        (["model.backend=tpu"], "model.backend='tpu' is invalid; valid: hf, vllm, auto"),
        (["model.path=/nonexistent/Qwen"], "model.path='/nonexistent/Qwen': no such model directory"),
        (["model.path=./models/qwen"], "model.path='./models/qwen': no such model directory"),
        (["data.files=[]"], "data.files is empty"),
        (["data.max_problems=0"], "data.max_problems=0 is invalid"),
        (["shard_problems=0"], "shard_problems=0 is invalid; valid: an integer >= 1"),
        (["overwrite=maybe"], "overwrite='maybe' is invalid; valid"),
        (["overwrite=no"], "overwrite='no' is invalid; valid: true, false"),
        (["model.use_chat_template=yes"], "model.use_chat_template='yes' is invalid; valid: true, false"),
        (["show_progress=0"], "show_progress=0 is invalid; valid: true, false"),
        (["tiny=no"], "tiny='no' is invalid; valid: true, false"),
        (["ray.enabled=sometimes"], "ray.enabled='sometimes' is invalid; valid: auto, True, False"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(tmp_path, overrides, message, monkeypatch):
    from verl_ext import generation
    from verl_ext.core import models
    from verl_ext.core.checks import ConfigError
    from verl_ext.evaluation.command import run

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(models, "load_hf_model", no_load)
    monkeypatch.setattr(generation, "sample_responses", no_load)
    (tmp_path / "m").mkdir()
    data = tmp_path / "d.parquet"
    data.write_text("x")
    base = [f"model.path={tmp_path / 'm'}", f"data.files=[{data}]", f"output_dir={tmp_path / 'o'}"]
    with pytest.raises(ConfigError) as err:
        run(_compose(base + overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_command_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "evaluate.sh"), "model.path=/nonexistent/model", f"output_dir={tmp_path}"],
        capture_output=True, text=True, check=False, env=_env(), timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "[evaluate] error: model.path='/nonexistent/model': no such model directory"


def test_rows_without_ground_truth_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from verl_ext.core.checks import ConfigError
    from verl_ext.evaluation.command import EvaluationError, load_problems, read_generations

    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "data_source": "x",
             "reward_model": {"style": "rule", "ground_truth": gt}} for gt in ("2", "")]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(EvaluationError, match=r"p.parquet row 2 \(counted from 1\): reward_model.ground_truth is empty"):
        load_problems([str(path)], None)
    gens = tmp_path / "g.jsonl"
    gens.write_text(json.dumps({"prompt_id": 0, "response": "r", "ground_truth": "1", "data_source": "x"}) + "\n\n"
                    + json.dumps({"prompt_id": 1, "response": "r", "ground_truth": " ", "data_source": "x"}) + "\n")
    columns = {k: k for k in ("prompt_id", "response", "ground_truth", "data_source", "response_length",
                              "accepted_answers")}
    with pytest.raises(EvaluationError, match=r"line 3: ground_truth \(column 'ground_truth'\) is empty"):
        read_generations(gens, columns)
    gens.write_text('{"prompt_id": 0}\n{not json\n')
    with pytest.raises(ConfigError, match=r"g.jsonl': line 2 is not valid JSON"):
        read_generations(gens, columns)


def test_evaluate_sh_without_argument_runs_the_tiny_default(tmp_path):
    """`bash scripts/evaluate.sh` alone: the tiny model on its arithmetic set, its size printed first."""
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "evaluate.sh")], capture_output=True, text=True,
                          check=False, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[evaluate] size: 16 problems x 4 samples x 32 max tokens = 64 responses, at most 2,048 tokens" in proc.stdout
    assert "| tiny_arith | 16 | 4 |" in proc.stdout
    assert (tmp_path / "outputs" / "eval" / "tiny" / "results.json").exists()


def test_tiny_fills_only_what_the_user_left_unset(tmp_path):
    """tiny=true: the tiny model where model.path is unset, its arithmetic set where data.files is the
    config's default; a model or files the user gives are kept (they were silently replaced before)."""
    from verl_ext.evaluation.command import apply_tiny_defaults
    from verl_ext.tiny_assets import ensure_tiny_assets

    assets = ensure_tiny_assets()
    cfg = _compose(["tiny=true"])
    apply_tiny_defaults(cfg)
    assert (cfg.model.path, list(cfg.data.files)) == (str(assets.model_dir), [str(assets.val_parquet)])
    mine = str(tmp_path / "mine.parquet")
    cfg = _compose(["tiny=true", f"data.files=[{mine}]", f"model.path={tmp_path}"])
    apply_tiny_defaults(cfg)
    assert (cfg.model.path, list(cfg.data.files)) == (str(tmp_path), [mine])
    cfg = _compose([f"data.files=[{mine}]"])  # tiny=false: nothing filled
    apply_tiny_defaults(cfg)
    assert (cfg.model.path, list(cfg.data.files)) == (None, [mine])


def test_size_and_eta_lines():
    from verl_ext.core.progress import eta_line, eta_seconds, format_duration, job_size, size_line

    assert job_size(186, 32, 8192) == (186 * 32, 186 * 32 * 8192)
    assert size_line(186, 32, 8192) == (
        "186 problems x 32 samples x 8,192 max tokens = 5,952 responses, at most 48,758,784 tokens")
    # rate so far: 32 responses in 12 s; 3,168 left -> 3168 * 12 / 32 s
    assert eta_seconds(32, 3200, 12.0) == pytest.approx(3168 * 12 / 32)
    assert eta_seconds(10, 10, 5.0) == 0.0
    with pytest.raises(ValueError, match="done=0"):
        eta_seconds(0, 10, 1.0)
    assert [format_duration(s) for s in (42, 200, 7500)] == ["42 s", "3 min 20 s", "2 h 05 min"]
    assert eta_line(32, 3200, 12.0) == "first 32 of 3,200 responses in 12.0 s: about 19 min 48 s left"
