"""Input checks shared by every command: one error style, raised before any model loads or Ray starts.

A bad setting raises `ConfigError` with one line that names the key, the bad value and what is
valid (`top_p=1.5 is invalid; valid: a number in (0, 1]`). A command's entry point wraps its work
in `exit_on_config_error(prog)`: the error becomes `[prog] error: <line>` on stderr and exit code 2,
with no traceback unless `VERL_EXT_TRACEBACK=1` (or hydra's `HYDRA_FULL_ERROR=1`) is set.

Verl-free and hydra-free on purpose: every layer may import it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_CODE = 2
TRACEBACK_ENV = ("VERL_EXT_TRACEBACK", "HYDRA_FULL_ERROR")
REMOTE_PREFIXES = ("hdfs://", "s3://", "gs://", "http://", "https://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A setting or input file that a command refuses, with a one-line message for the user."""


def invalid(key: str, value: Any, valid: str, why: str = "") -> ConfigError:
    """`key=value is invalid[ (why)]; valid: valid`, the one message shape for a bad setting."""
    because = f" ({why})" if why else ""
    return ConfigError(f"{key}={value!r} is invalid{because}; valid: {valid}")


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a number {'>' if low_open else '>='} {low}"
    if low is None:
        return f"a number {'<' if high_open else '<='} {high}"
    return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_number(
    value: Any,
    key: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    allow_none: bool = False,
) -> Any:
    """`value` if it is a finite number (an integer when `integer`) in the interval, else ConfigError.

    Bools are refused (hydra turns `true` into a bool, never a number the user meant); numpy
    scalars are accepted. None passes only with `allow_none`.
    """
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    valid = _interval(low, high, low_open, high_open).replace("a number", kind, 1)
    if integer and low is None and high is None:
        valid = "an integer"
    if allow_none:
        valid += ", or null"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(key, value, valid)
    if integer and not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise invalid(key, value, valid)
        value = int(value)
    if not math.isfinite(value):
        raise invalid(key, value, valid)
    if low is not None and (value < low or (low_open and value == low)):
        raise invalid(key, value, valid)
    if high is not None and (value > high or (high_open and value == high)):
        raise invalid(key, value, valid)
    return value


def check_choice(value: Any, key: str, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise invalid(key, value, ", ".join(map(str, choices)))
    return value


def check_flag(value: Any, key: str) -> bool:
    """`value` if it is a bool, else ConfigError: hydra reads only true/false as bools, so `overwrite=no`
    arrives as the string "no", which Python would take as true."""
    if not isinstance(value, bool):
        raise invalid(key, value, "true, false")
    return value


def check_list(
    values: Any, key: str, check_item: Callable[[Any, str], Any] | None = None, *, nonempty: bool = True
) -> list:
    """A list (any non-string sequence), non-empty unless told otherwise, each item passed to `check_item(item, key[i])`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise invalid(key, values, "a list, e.g. [a, b]")
    values = list(values)
    if nonempty and not values:
        raise ConfigError(f"{key} is empty; valid: a list with at least one item")
    if check_item is not None:
        values = [check_item(item, f"{key}[{i}]") for i, item in enumerate(values)]
    return values


def check_file(path: Any, key: str, *, nonempty: bool = True, suffixes: Sequence[str] | None = None) -> Path:
    """An existing regular file (non-empty unless told otherwise, with one of `suffixes` when given)."""
    if not path:
        raise ConfigError(f"{key} is not set; valid: a path to an existing file")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such file")
    if suffixes and p.suffix not in suffixes:
        raise invalid(key, str(path), f"a file ending in {', '.join(suffixes)}")
    if nonempty and p.stat().st_size == 0:
        raise ConfigError(f"{key}={str(path)!r}: the file is empty")
    return p


def check_writable_dir(path: Any, key: str) -> Path:
    """A directory we can create (if missing) and write in: checked on its nearest existing ancestor."""
    if not path:
        raise ConfigError(f"{key} is not set; valid: a writable directory")
    p = Path(os.path.expanduser(str(path))).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK) or not _can_create_file_in(probe):
        raise ConfigError(f"{key}={str(path)!r}: {probe} is not writable")
    return p


def _can_create_file_in(folder: Path) -> bool:
    """Try it: `os.access` says yes to root on a read-only file system."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_PREFIXES)


def looks_like_hub_id(path: str) -> bool:
    """`org/name` that is not a local path (no leading `.`, `/` or `~`)."""
    return bool(_HUB_ID.match(str(path))) and not str(path).startswith((".", "/", "~"))


def hub_is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(path: Any, key: str) -> str:
    """A local model directory that exists, a remote URI, or a hub id (in the local cache when offline).

    A path that is not a hub id is never sent to the hub: its absence is reported here, not as the
    hub's "Repo id must be in the form ..." a minute later.
    """
    if not path:
        raise ConfigError(f"{key} is not set; valid: a local model directory or a hub id such as Qwen/Qwen2.5-Math-7B")
    path = str(path)
    if is_remote(path) or os.path.isdir(os.path.expanduser(path)):
        return path
    if not looks_like_hub_id(path):
        raise ConfigError(f"{key}={path!r}: no such model directory")
    if hub_is_offline() and not _in_hub_cache(path):
        raise ConfigError(
            f"{key}={path!r}: not a local directory, and the hub is offline (HF_HUB_OFFLINE) with no cached copy; "
            "download it first or give a local directory"
        )
    return path


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings it
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _show_traceback() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in TRACEBACK_ENV)


@contextlib.contextmanager
def exit_on_config_error(prog: str, errors: tuple[type[BaseException], ...] = (ConfigError,)) -> Iterator[None]:
    """Turn `errors` raised inside into `[prog] error: <message>` on stderr and exit code 2."""
    try:
        yield
    except errors as err:
        if _show_traceback():
            raise
        print(f"[{prog}] error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE) from None


def check_sampling(
    section: Any, prefix: str, *, keys: Sequence[str] = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "batch_size")
) -> None:
    """The usual sampling knobs of a config section (a mapping), each under its full key `prefix.name`.

    n >= 1, temperature finite >= 0 (0 = greedy), top_p in (0, 1], top_k -1 (off) or >= 1,
    max_new_tokens >= 1, batch_size >= 1, seed an integer: only the `keys` the section has.
    """
    rules = {
        "n": {"low": 1, "integer": True},
        "temperature": {"low": 0},
        "top_p": {"low": 0, "high": 1, "low_open": True},
        "max_new_tokens": {"low": 1, "integer": True},
        "batch_size": {"low": 1, "integer": True},
        "seed": {"integer": True},
    }
    for name in keys:
        if name not in section:
            continue
        value = section[name]
        if name == "top_k":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (value == -1 or value >= 1):
                raise invalid(f"{prefix}.top_k", value, "-1 (off) or an integer >= 1")
            continue
        check_number(value, f"{prefix}.{name}", **rules[name])


def read_jsonl(path: Any, key: str, required: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number counted from 1, row) for every non-blank line of a JSONL file; ConfigError naming the
    file and line for a line that is not a JSON object or lacks a `required` field (or has it empty),
    and for a file with no rows."""
    import json

    p = check_file(path, key)
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{key}={str(path)!r}: line {lineno} is not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{key}={str(path)!r}: line {lineno} is not a JSON object")
            for field in required:
                if field not in row:
                    raise ConfigError(f"{key}={str(path)!r}: line {lineno} has no field {field!r}; fields are {sorted(row)}")
                if row[field] is None or (isinstance(row[field], str) and not row[field].strip()):
                    raise ConfigError(f"{key}={str(path)!r}: line {lineno}: field {field!r} is empty")
            rows.append((lineno, row))
    if not rows:
        raise ConfigError(f"{key}={str(path)!r}: the file has no rows")
    return rows
