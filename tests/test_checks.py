"""verl_ext.core.checks: one message shape, every non-finite or out-of-range value refused, exit code 2."""

import math
import re
import subprocess
import sys

import numpy as np
import pytest

from verl_ext.core.checks import (
    ConfigError,
    check_choice,
    check_file,
    check_flag,
    check_list,
    check_model_source,
    check_number,
    check_writable_dir,
)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -0.1, 1.5, True, "0.5", None])
def test_top_p_like_interval_refuses(value):
    with pytest.raises(ConfigError) as err:
        check_number(value, "rollout.top_p", low=0, high=1, low_open=True)
    assert str(err.value) == f"rollout.top_p={value!r} is invalid; valid: a number in (0, 1]"


@pytest.mark.parametrize("value", [1e-9, 0.7, 1, 1.0, np.float32(0.5), np.int64(1)])
def test_top_p_like_interval_accepts(value):
    assert check_number(value, "top_p", low=0, high=1, low_open=True) == value


@pytest.mark.parametrize("value", ["no", "yes", "false", "maybe", 0, 1, None, 1.0])
def test_a_flag_is_a_bool_and_nothing_else(value):
    with pytest.raises(ConfigError) as err:  # "no" and "false" are non-empty strings: Python would read them as true
        check_flag(value, "overwrite")
    assert str(err.value) == f"overwrite={value!r} is invalid; valid: true, false"
    assert check_flag(True, "overwrite") is True and check_flag(False, "overwrite") is False


def test_integer_and_none():
    assert check_number(np.int64(3), "n", low=1, integer=True) == 3
    assert check_number(4.0, "n", low=1, integer=True) == 4
    with pytest.raises(ConfigError, match=r"n=2.5 is invalid; valid: an integer >= 1"):
        check_number(2.5, "n", low=1, integer=True)
    assert check_number(None, "k", allow_none=True) is None
    with pytest.raises(ConfigError, match="or null"):
        check_number(math.nan, "k", allow_none=True)
    with pytest.raises(ConfigError, match=r"valid: a number < 0"):
        check_number(0, "tau", high=0, high_open=True)


def test_choice_and_list():
    assert check_choice("vllm", "backend", ["hf", "vllm"]) == "vllm"
    with pytest.raises(ConfigError, match=r"backend='x' is invalid; valid: hf, vllm"):
        check_choice("x", "backend", ["hf", "vllm"])
    assert check_list([0.1, 0.2], "gammas", lambda v, k: check_number(v, k, low=0)) == [0.1, 0.2]
    with pytest.raises(ConfigError, match=r"gammas is empty"):
        check_list([], "gammas")
    with pytest.raises(ConfigError, match=r"gammas\[1\]=nan is invalid"):
        check_list([0.1, math.nan], "gammas", lambda v, k: check_number(v, k, low=0))
    with pytest.raises(ConfigError, match=r"gammas='0.1' is invalid; valid: a list"):
        check_list("0.1", "gammas")


def test_files_and_dirs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        check_file(empty, "data")
    with pytest.raises(ConfigError, match="no such file"):
        check_file(tmp_path / "missing.jsonl", "data")
    full = tmp_path / "a.parquet"
    full.write_text("x")
    with pytest.raises(ConfigError, match=r"valid: a file ending in \.jsonl"):
        check_file(full, "data", suffixes=[".jsonl"])
    assert check_writable_dir(tmp_path / "new" / "deeper", "out") == tmp_path / "new" / "deeper"
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_writable_dir(full / "sub", "out")


def test_model_source(tmp_path, monkeypatch):
    assert check_model_source(str(tmp_path), "model") == str(tmp_path)
    with pytest.raises(ConfigError, match="no such model directory"):
        check_model_source(str(tmp_path / "nope"), "model")
    with pytest.raises(ConfigError, match="no such model directory"):
        check_model_source("./models/qwen", "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="hub is offline"):
        check_model_source("Qwen/Qwen2.5-Math-7B", "model")


def test_exit_on_config_error_one_line_exit_2():
    code = (
        "from verl_ext.core.checks import exit_on_config_error, check_number\n"
        "with exit_on_config_error('demo'):\n"
        "    check_number(float('nan'), 'decoding.temperature', low=0, low_open=True)\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr == "[demo] error: decoding.temperature=nan is invalid; valid: a number > 0\n"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={**env, "VERL_EXT_TRACEBACK": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr


@pytest.mark.parametrize(
    "section,message",
    [
        ({"temperature": math.nan}, "s.temperature=nan is invalid; valid: a number >= 0"),
        ({"temperature": -0.5}, "s.temperature=-0.5 is invalid; valid: a number >= 0"),
        ({"top_p": 1.01}, "s.top_p=1.01 is invalid; valid: a number in (0, 1]"),
        ({"top_k": 0}, "s.top_k=0 is invalid; valid: -1 (off) or an integer >= 1"),
        ({"top_k": 2.5}, "s.top_k=2.5 is invalid; valid: -1 (off) or an integer >= 1"),
        ({"n": 0}, "s.n=0 is invalid; valid: an integer >= 1"),
        ({"max_new_tokens": math.inf}, "s.max_new_tokens=inf is invalid; valid: an integer >= 1"),
        ({"seed": 0.5}, "s.seed=0.5 is invalid; valid: an integer"),
    ],
)
def test_sampling_section(section, message):
    from verl_ext.core.checks import check_sampling

    good = {"n": 4, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8, "batch_size": 2, "seed": 0}
    check_sampling(good, "s", keys=list(good))  # greedy, no nucleus, no top-k: all valid
    with pytest.raises(ConfigError) as err:
        check_sampling({**good, **section}, "s", keys=list(good))
    assert str(err.value) == message


def test_read_jsonl_names_file_and_line(tmp_path):
    from verl_ext.core.checks import read_jsonl

    path = tmp_path / "p.jsonl"
    path.write_text('{"q": "a"}\n\n{"q": "b"}\n')
    assert read_jsonl(path, "input", required=["q"]) == [(1, {"q": "a"}), (3, {"q": "b"})]
    for content, message in [
        ('{"q": "a"}\n\n{"q": \n', "line 3 is not valid JSON"),
        ('{"q": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"q": "a"}\n{"r": 1}\n', "line 2 has no field 'q'; fields are ['r']"),
        ('{"q": null}\n', "line 1: field 'q' is empty"),
        ("\n \n", "the file has no rows"),
    ]:
        path.write_text(content)
        with pytest.raises(ConfigError, match=re.escape(f"input='{path}': {message}")):
            read_jsonl(path, "input", required=["q"])
