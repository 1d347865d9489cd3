"""The Δlog p analysis command end to end on tiny random models (CPU): sampling, shards, resume,
file inputs (our parquet, verl JSONL dumps), report numbers vs the parquet, plots, errors, Ray."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

from verl_ext.analysis import logp_diff, report
from verl_ext.analysis.logp_diff import AnalysisWorker, ShardTask, WorkerSpec, read_generation_parquet
from verl_ext.jobs import ResumeError, WorkerPool

REPO = Path(__file__).resolve().parents[1]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
SPECIALS = ["<pad>", "<eos>", "<user>", "<assistant>", "<unk>"]
TEMPLATE = (
    "{% for m in messages %}<user>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(extra: tuple[str, ...] = ()):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + list(extra))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>"],
        padding_side="left",
    )
    tok.chat_template = TEMPLATE
    return tok


def save_model(path: Path, seed: int, tokenizer) -> Path:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("logp_diff_assets")
    tok = char_tokenizer()
    base, rl = save_model(root / "base", 0, tok), save_model(root / "rl", 1, tok)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"question": f"What is {a}+{a}?", "answer": str(2 * a)}) + "\n" for a in range(4))
    )
    return {"base": base, "rl": rl, "prompts": prompts, "root": root}


def make_cfg(assets, out: Path, *extra: str):
    overrides = [
        f"models.base={assets['base']}",
        f"models.rl={assets['rl']}",
        f"output_dir={out}",
        f"input.prompts={assets['prompts']}",
        "input.prompt_key=question",
        "input.prompt_suffix=",
        "input.max_prompts=4",
        "sampling.n=2",
        "sampling.max_new_tokens=6",
        "sharding.prompts_per_shard=2",
        "scoring.chunk_size=5",
        "report.min_token_count=1",
        "report.top_k=5",
        "show_progress=false",
        "ray.enabled=false",
        "wandb.enable=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose("analyze_logp_diff", overrides=overrides)


def naive_delta_logp(base, rl, prompt_ids, response_ids) -> np.ndarray:
    """Δlog p of each response token from one full forward pass of each model (no batching, no chunks)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    out = []
    for m in (base, rl):
        with torch.no_grad():
            logp = torch.log_softmax(m(ids).logits[0].double(), -1)
        p = len(prompt_ids)
        out.append(np.array([logp[p - 1 + t, y].item() for t, y in enumerate(response_ids)]))
    return out[1] - out[0]


def shard_mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.glob("shard-*.parquet"))}


# ----------------------------------------------------------------------------- end to end


def test_sample_score_report_resume(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(assets, out)
    files = logp_diff.run(cfg)

    # shards: 4 prompts / 2 per shard -> 2 sampling shards per generator and 2 token shards
    assert sorted(shard_mtimes(out / "tokens")) == ["shard-00000.parquet", "shard-00001.parquet"]
    for g in ("base", "rl"):
        assert len(shard_mtimes(out / "generations" / g)) == 2
    gens = [
        r
        for g in ("base", "rl")
        for f in sorted((out / "generations" / g).glob("shard-*"))
        for r in read_generation_parquet(f, None)
    ]
    assert len(gens) == 2 * 4 * 2 and {r.generator for r in gens} == {"base", "rl"}
    df = logp_diff.read_token_metrics(out)
    assert len(df) == sum(len(r.response_ids) for r in gens)
    # token rows line up with the generations, and Δlog p agrees with a naive full forward pass
    from transformers import AutoModelForCausalLM

    base, rl = (
        AutoModelForCausalLM.from_pretrained(str(assets[k]), dtype=torch.float32).eval() for k in ("base", "rl")
    )
    for rec in (gens[0], gens[-1]):
        rows = df[df.response_id == rec.response_id].sort_values("position")
        assert rows.token_id.tolist() == rec.response_ids and rows.position.tolist() == list(
            range(len(rec.response_ids))
        )
        assert rows.generator.unique().tolist() == [rec.generator]
        ref = naive_delta_logp(base, rl, rec.prompt_ids, rec.response_ids)
        np.testing.assert_allclose(rows.delta_logp.to_numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(df.delta_logp, df.logp_rl - df.logp_base, atol=1e-6)

    # report numbers match the parquet
    summary = json.loads((out / "summary.json").read_text())
    for g, sub in df.groupby("generator"):
        s = summary["generators"][g]
        assert s["tokens"] == len(sub) and s["responses"] == sub.response_id.nunique()
        for tau in cfg.report.tail_thresholds:
            t = s["tails"][f"{tau:g}"]
            assert t["frac_below_neg_tau"] == pytest.approx(float((sub.delta_logp < -tau).mean()))
            assert t["frac_above_tau"] == pytest.approx(float((sub.delta_logp > tau).mean()))
        for m in ("delta_logp", "kl_avg", "entropy_base"):
            assert s["metrics"][m]["mean"] == pytest.approx(float(sub[m].astype(np.float64).mean()), rel=1e-6, abs=1e-9)
    bins = pd.read_csv(out / "prob_by_delta_bin.csv")
    assert bins.groupby("generator")["count"].sum().to_dict() == df.groupby("generator").size().to_dict()
    up = pd.read_csv(out / "top_tokens_up.csv")
    assert 0 < len(up) <= 5 and up.mean_delta_logp.is_monotonic_decreasing
    assert "P(Δlogp < −τ)" in (out / "summary.md").read_text()
    for name in ("histograms", "prob_by_delta_bin"):
        png = files[name].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # resume: an interrupted run left a temp file, lost one token shard and one generation shard
    before_tokens, before_gen = shard_mtimes(out / "tokens"), shard_mtimes(out / "generations" / "rl")
    lost_tokens = pq.read_table(out / "tokens" / "shard-00001.parquet")
    lost_gen = pq.read_table(out / "generations" / "rl" / "shard-00000.parquet")
    (out / "tokens" / "shard-00001.parquet").unlink()
    (out / "generations" / "rl" / "shard-00000.parquet").unlink()
    (out / "tokens" / ".shard-00001.parquet.tmp-999").write_bytes(b"partial")
    calls = {"sample": [], "score": []}
    real_sample, real_score = AnalysisWorker.sample, AnalysisWorker.score
    monkeypatch.setattr(
        AnalysisWorker,
        "sample",
        lambda self, job: calls["sample"].append((job.generator, job.shard.index)) or real_sample(self, job),
    )
    monkeypatch.setattr(AnalysisWorker, "score", lambda self, t: calls["score"].append(t.index) or real_score(self, t))
    logp_diff.run(cfg)
    assert calls == {"sample": [("rl", 0)], "score": [1]}
    after_tokens, after_gen = shard_mtimes(out / "tokens"), shard_mtimes(out / "generations" / "rl")
    assert after_tokens["shard-00000.parquet"] == before_tokens["shard-00000.parquet"]
    assert after_gen["shard-00001.parquet"] == before_gen["shard-00001.parquet"]
    assert pq.read_table(out / "generations" / "rl" / "shard-00000.parquet").equals(lost_gen)  # seeded per shard
    assert pq.read_table(out / "tokens" / "shard-00001.parquet").equals(lost_tokens)
    assert len(logp_diff.read_token_metrics(out)) == len(df)

    # another configuration in the same folder is refused
    with pytest.raises(ResumeError, match=r"other settings \(sampling.n: 2 -> 3\).*overwrite=true"):
        logp_diff.run(make_cfg(assets, out, "sampling.n=3"))


def write_verl_dump(folder: Path, step: int, pairs: list[tuple[str, str]]) -> Path:
    """The JSONL verl 0.9.1 writes for trainer.rollout_data_dir / validation_data_dir
    (RayPPOTrainer._write_generations): one line per sample with input, output, gts, score, step
    and the reward extras; texts decoded with skip_special_tokens=True."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{step}.jsonl"
    with open(path, "w") as f:
        f.writelines(
            json.dumps(
                {"input": inp, "output": outp, "gts": "4", "score": 1.0, "step": step, "acc": 1.0, "uid": f"u{i}"}
            )
            + "\n"
            for i, (inp, outp) in enumerate(pairs)
        )
    return path


def test_files_input_parquet_and_verl_dump(assets, tmp_path, monkeypatch):
    tok = char_tokenizer()
    gen_parquet = tmp_path / "gens.parquet"
    rows = [
        {"prompt_ids": tok("user: 1+1?")["input_ids"], "response_ids": tok("2 done")["input_ids"], "generator": "rl"},
        {"prompt_ids": tok("user: 2+2?")["input_ids"], "response_ids": tok("four")["input_ids"], "generator": "base"},
    ]
    pd.DataFrame(rows).to_parquet(gen_parquet)
    dump = tmp_path / "val_dump"
    write_verl_dump(
        dump, 10, [("user\nWhat is 2+2?\nassistant\n", "It is \\boxed{4}"), ("user\nWhat is 2+2?\nassistant\n", "4")]
    )
    write_verl_dump(dump, 20, [("user\nWhat is 3+3?\nassistant\n", "6")])
    out = tmp_path / "run"
    cfg = make_cfg(
        assets,
        out,
        "input.source=files",
        "sharding.responses_per_shard=2",
        f"input.files=[{{path: {gen_parquet}}}, {{path: {dump}, generator: rl_val}}]",
        "wandb.enable=auto",
    )
    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb.enable=auto logs when WANDB_MODE is set
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.warns(UserWarning, match="re-tokenised"):
        logp_diff.run(cfg)
    df = logp_diff.read_token_metrics(out)
    assert len(shard_mtimes(out / "tokens")) == 3  # 5 responses, 2 per shard
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(assets["base"]))  # the tokenizer the command re-tokenises with
    n_dump = sum(len(loaded(t, add_special_tokens=False)["input_ids"]) for t in ("It is \\boxed{4}", "4", "6"))
    assert df.groupby("generator").size().to_dict() == {"rl": len(rows[0]["response_ids"]), "base": 4, "rl_val": n_dump}
    dumped = df[df.generator == "rl_val"]
    assert sorted(dumped.response_id.unique()) == ["rl_val-step10-0", "rl_val-step10-1", "rl_val-step20-0"]
    assert dumped.groupby("response_id").sample_index.first().tolist() == [0, 1, 0]  # same input -> same prompt
    text = "".join(dumped[dumped.response_id == "rl_val-step10-0"].sort_values("position").token_text)
    assert text == loaded.decode(loaded("It is \\boxed{4}", add_special_tokens=False)["input_ids"])
    assert (out / "histograms.png").stat().st_size > 5000
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_different_tokenizers_fail_before_any_work(assets, tmp_path):
    other = save_model(tmp_path / "rl_other_tok", 2, char_tokenizer(extra=("<think>",)))
    cfg = make_cfg(assets, tmp_path / "run", f"models.rl={other}")
    with pytest.raises(
        ValueError, match=r"tokenizers differ: vocabulary sizes (\d+) vs (?!\1)\d+ .*only in RL: \['<think>'\]"
    ):
        logp_diff.run(cfg)
    assert not (tmp_path / "run" / "tokens").exists()


def test_config_errors_name_valid_choices(assets, tmp_path):
    with pytest.raises(ValueError, match=r"input.source='web' is invalid; valid: sample, files"):
        logp_diff.run(make_cfg(assets, tmp_path / "a", "input.source=web"))
    with pytest.raises(ValueError, match=r"models.rl is not set"):
        logp_diff.run(make_cfg(assets, tmp_path / "b", "models.rl=null"))
    with pytest.raises(ValueError, match=r"valid: a non-empty list of base, rl"):
        logp_diff.run(make_cfg(assets, tmp_path / "c", "sampling.generators=[sft]"))
    with pytest.raises(ValueError, match=r"input.files is empty"):
        logp_diff.run(make_cfg(assets, tmp_path / "d", "input.source=files"))
    with pytest.raises(ValueError, match=r"no column 'problem'"):
        logp_diff.read_prompt_rows(_prompt_parquet(tmp_path), "problem")


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.temperature=nan", "sampling.temperature=nan is invalid; valid: a number >= 0"),
        ("sampling.top_p=1.5", "sampling.top_p=1.5 is invalid; valid: a number in (0, 1]"),
        ("report.tail_thresholds=[nan]", "report.tail_thresholds[0]=nan is invalid; valid: a number >= 0"),
        ("report.tail_thresholds=[]", "report.tail_thresholds is empty"),
        ("report.tail_thresholds=[-0.1]", "report.tail_thresholds[0]=-0.1 is invalid; valid: a number >= 0"),
        ("report.delta_bin_edges=[1,0]", "report.delta_bin_edges=[1, 0] is invalid; valid: at least 2 strictly increasing"),
        ("scoring.chunk_size=0", "scoring.chunk_size=0 is invalid; valid: an integer >= 1"),
        ("models.dtype=float8", "models.dtype='float8' is invalid; valid: auto, float32, bfloat16, float16"),
        ("models.device=gpu", "models.device='gpu' is invalid; valid: auto, cpu, cuda, cuda:N"),
        ("models.base=/nonexistent/base", "models.base='/nonexistent/base': no such model directory"),
        ("overwrite=no", "overwrite='no' is invalid; valid: true, false"),
        ("sampling.generators=base", "sampling.generators='base' is invalid; valid: a list, e.g. [a, b]"),  # not b, a, s, e  # "no" is truthy: it would delete results
        ("input.use_chat_template=yes", "input.use_chat_template='yes' is invalid; valid: true, false"),
        ("show_progress=maybe", "show_progress='maybe' is invalid; valid: true, false"),
    ],
)
def test_bad_settings_are_refused_before_models_load(assets, tmp_path, override, message, monkeypatch):
    from verl_ext.core.checks import ConfigError

    def no_load(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the settings were checked")

    monkeypatch.setattr(logp_diff, "load_tokenizers", no_load)
    with pytest.raises(ConfigError) as err:
        logp_diff.run(make_cfg(assets, tmp_path / "bad", override))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad" / "tokens").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "input.prompts='{path}': the file is empty"),
        ('{"question": "a"}\n{"question": \n', "input.prompts='{path}': line 2 is not valid JSON"),
        ('{"question": "a"}\n\n{"q": "b"}\n', "input.prompts='{path}': line 3 has no field 'question'"),
        ('{"question": ""}\n', "input.prompts='{path}': line 1: field 'question' is empty"),
    ],
)
def test_bad_prompt_files_name_file_and_line(assets, tmp_path, content, message):
    from verl_ext.core.checks import ConfigError

    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        logp_diff.run(make_cfg(assets, tmp_path / "o", f"input.prompts={path}"))
    assert message.format(path=path) in str(err.value)


def test_command_error_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "analyze_logp_diff.sh"), f"output_dir={tmp_path}", "sampling.temperature=nan"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "[analyze_logp_diff] error: sampling.temperature=nan is invalid; valid: a number >= 0")
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr


def _prompt_parquet(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": [[{"role": "user", "content": "hi"}]]}).to_parquet(p)
    return p


# ----------------------------------------------------------------------------- report functions


def synthetic_tokens() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 400
    lb = np.log(rng.uniform(0.01, 1.0, n))
    d = rng.normal(0, 0.7, n)
    df = pd.DataFrame(
        {
            "generator": np.where(np.arange(n) < 150, "base", "rl"),
            "response_id": [f"r{i // 10}" for i in range(n)],
            "token_id": rng.integers(0, 12, n),
            "logp_base": lb,
            "logp_rl": np.minimum(lb + d, 0.0),
        }
    )
    df["delta_logp"] = df.logp_rl - df.logp_base
    df["token_text"] = ["t|" + str(t) for t in df.token_id]
    for m in ("entropy_base", "entropy_rl", "kl_rl_base", "kl_base_rl", "kl_avg"):
        df[m] = rng.uniform(0, 2, n)
    df.loc[3, "kl_rl_base"] = math.inf
    return df


def test_tail_fractions_and_bins_by_hand():
    df = synthetic_tokens()
    tails = report.tail_fractions(df, [0.0, 0.5])
    for row in tails.itertuples():
        d = df[df.generator == row.generator].delta_logp.to_numpy()
        assert row.frac_below_neg_tau == sum(x < -row.tau for x in d) / len(d)
        assert row.frac_above_tau == sum(x > row.tau for x in d) / len(d)
    with pytest.raises(ValueError, match=r"magnitudes τ ≥ 0.*got -0.1"):
        report.tail_fractions(df, [-0.1])
    edges = [-1.0, 0.0, 1.0]
    bins = report.probability_by_delta_bins(df, edges)
    rl = df[df.generator == "rl"]
    low = rl[rl.delta_logp < 0.0]  # first bin takes everything below 0 (also below −1)
    row = bins[(bins.generator == "rl") & (bins.bin_left == -1.0)].iloc[0]
    assert row["count"] == len(low)
    assert row.mean_p_base == pytest.approx(np.exp(low.logp_base).mean())
    assert row.mean_p_rl == pytest.approx(np.exp(low.logp_rl).mean())
    p = np.exp(low.logp_base.to_numpy())
    assert row.se_p_base == pytest.approx(math.sqrt(((p - p.mean()) ** 2).sum() / (len(p) - 1) / len(p)))
    with pytest.raises(ValueError, match="strictly increasing"):
        report.probability_by_delta_bins(df, [0.0, 0.0])


def test_top_tokens_and_statistics():
    df = synthetic_tokens()
    up, down = report.top_tokens(df, k=3, min_count=30)
    means = df.groupby("token_id").delta_logp.agg(["mean", "size"])
    means = means[means["size"] >= 30].sort_values("mean")
    assert down.token_id.tolist() == means.index[:3].tolist()
    assert up.token_id.tolist() == means.index[::-1][:3].tolist()
    assert (up["count"] >= 30).all()
    stats = report.metric_statistics(df)
    kl = stats[(stats.generator == "base") & (stats.metric == "kl_rl_base")].iloc[0]
    assert kl.non_finite == 1 and math.isfinite(kl["mean"])
    assert "t\\|3" in report.markdown_table(up.assign(token_text="t|3"))


# ----------------------------------------------------------------------------- Ray


def test_ray_actors_match_in_process(assets, tmp_path):
    """Two CPU actors (num_cpus=1 each) score shards; the merged result equals the in-process one."""
    ray = pytest.importorskip("ray")
    tok = char_tokenizer()
    records = [
        logp_diff.ResponseRecord(f"x-{i}", "base", i, 0, tok(f"q{i}?")["input_ids"], tok("ans" * (i + 1))["input_ids"])
        for i in range(4)
    ]
    tasks = logp_diff.plan_scoring_shards(records, 2)
    spec = WorkerSpec(
        str(assets["base"]), str(assets["rl"]), str(assets["base"]), "cpu", "float32", {}, {"chunk_size": 4}, False
    )
    local: dict[int, pd.DataFrame] = {}
    with WorkerPool(functools.partial(AnalysisWorker, spec), {"enabled": False}) as pool:
        pool.map(AnalysisWorker.score, tasks, lambda t, tbl: local.__setitem__(t.index, tbl.to_pandas()))
    remote: dict[int, pd.DataFrame] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with WorkerPool(functools.partial(AnalysisWorker, spec), {"enabled": True, "num_workers": 2},
                        use_gpus=False) as pool:
            pool.map(AnalysisWorker.score, tasks, lambda t, tbl: remote.__setitem__(t.index, tbl.to_pandas()))
            assert len(pool.actors()) == 2
    finally:
        ray.shutdown()
    assert sorted(remote) == sorted(local) == [0, 1]
    for i, frame in local.items():
        pd.testing.assert_frame_equal(remote[i], frame, check_exact=False, atol=1e-5, rtol=1e-4)  # thread counts differ


def test_shard_task_round_trip():
    rec = logp_diff.ResponseRecord("a", "rl", 1, 2, [1, 2], [3], "x", "stop")
    assert logp_diff.records_from_table(logp_diff.records_to_table([rec])) == [rec]
    assert [t.index for t in logp_diff.plan_sampling_shards([(i, [i]) for i in range(5)], 2)] == [0, 1, 2]
    assert ShardTask(0).records == []
