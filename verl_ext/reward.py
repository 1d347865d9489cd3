"""Math reward: extract the final answer of a response and grade it with Math-Verify, bounded in time.

Public API (other modules and verl rely on these names):

- `extract_boxed_answer(text)`: content of the last brace-balanced `\\boxed{...}` / `\\fbox{...}`
  (or `\\boxed 5` without braces), else None.
- `extract_answer(text)`: the boxed answer, else DAPO-Math-17k's last "Answer: ..." line, else None.
- `grade_answer(pred, ground_truth, timeout_s)`: is an extracted answer equivalent to the ground truth.
- `is_correct(response, ground_truth, timeout_s)`: extract + grade.
- `compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)`:
  {"score": +1.0 | -1.0, "acc": bool, "pred": str (at most MAX_ANSWER_CHARS)}: verl's custom reward function
  (`reward.custom_reward_function.path=<this file or pkg://verl_ext.reward>`,
  `reward.custom_reward_function.name=compute_score`), with the keys verl's `dapo` reward
  manager reads (`score`, then adds the overlong penalty), dynamic sampling filters on (`acc`)
  and validation uses for majority voting (`pred`).

Why a worker process. Math-Verify bounds its own time with `signal.alarm`, which only works in
the main thread: verl calls `compute_score` from a thread pool (`loop.run_in_executor`), where
Math-Verify's timeouts raise instead. Some inputs also never finish (`9^{9^{9}}`,
`(x+1)^{100000}`, deeply nested braces) and some are a single long C-level operation that no
signal can interrupt. So we call Math-Verify with its timeouts disabled inside long-lived
worker processes (`python -c`, no multiprocessing re-import of `__main__`, safe in Ray workers
and threads) and bound each answer ourselves: a worker that misses the deadline is killed and
replaced, and the answer is graded wrong. Cheap pre-checks (exact match, plain numbers, size and
nesting limits) answer most cases without a round trip.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0  # per answer, wall clock, Math-Verify's own default bound
STARTUP_TIMEOUT_S = 120.0  # a worker importing sympy + Math-Verify (seconds)
MAX_ANSWER_CHARS = 1000  # longer extracted answers are graded wrong without parsing
MAX_BRACE_DEPTH = 32  # deeper brace nesting is graded wrong without parsing
NUM_WORKERS_ENV = "VERL_EXT_GRADER_WORKERS"  # at most this many worker processes per process
DEFAULT_MAX_WORKERS = 16  # the pool grows to the callers' concurrency, up to this
SPARE_WORKERS = 1  # ready workers kept beyond the callers in flight
MIN_GRADE_S = 0.01  # a caller left with less time than this after waiting is graded wrong without asking
SCORE_CORRECT, SCORE_WRONG = 1.0, -1.0

# ----------------------------------------------------------------------------- extraction

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE = re.compile(r"answer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_UNBRACED_TOKEN = re.compile(r"[^\s$]+")


def matching_braces(text: str) -> dict[int, int]:
    """{index of `{`: index of its matching `}`} for every balanced pair, in one left-to-right pass.

    A stack of open braces; escaped braces (`\\{`, `\\}`) and any other backslash pair do not count.
    An unmatched `{` is absent. Linear in len(text), whatever the number of unclosed braces.
    """
    pairs, stack, i, n = {}, [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _box_content(text: str, after: int, pairs: dict[int, int]) -> str | None:
    """Argument of a box command ending at `after`: `{...}` balanced, or one bare token (`\\boxed 5`)."""
    i = after
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        close = pairs.get(i)
        return None if close is None else text[i + 1 : close]
    if i == after:  # `\boxed5` or `\boxed` at the end: not an argument
        return None
    token = _UNBRACED_TOKEN.match(text, i)
    return token.group(0).rstrip(".,;") if token else None


def extract_boxed_answer(text: str | None) -> str | None:
    """Content of the last brace-balanced `\\boxed{...}` or `\\fbox{...}` in `text`, stripped.

    `\\boxed 5` (one token, no braces) counts too. A box whose braces never close (a truncated
    response) is skipped in favour of the previous complete one. None when there is no box.
    Linear time: the braces are matched once for the whole text (`matching_braces`), so a response
    of 100k characters of unclosed `\\boxed{` costs one pass, not one pass per box.
    """
    if not text:
        return None
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    pairs = matching_braces(text)
    for match in reversed(matches):
        content = _box_content(text, match.end(), pairs)
        if content is not None:
            return content.strip()
    return None


def extract_answer_line(text: str | None) -> str | None:
    """DAPO-Math-17k's convention: the rest of the line after the last "Answer:", `$` and final `.` removed."""
    if not text:
        return None
    last = None
    for last in _ANSWER_LINE.finditer(text):
        pass
    if last is None:
        return None
    answer = last.group(1).strip().rstrip(".").strip()
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer or None


def extract_answer(text: str | None) -> str | None:
    """The answer a response commits to: last `\\boxed{}` content, else the last "Answer:" line, else None."""
    boxed = extract_boxed_answer(text)
    return boxed if boxed is not None else extract_answer_line(text)


# ----------------------------------------------------------------------------- pre-checks

_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def normalize_answer(answer: str) -> str:
    """Strip whitespace and one pair of surrounding math delimiters (`$..$`, `\\(..\\)`, `\\[..\\]`)."""
    answer = answer.strip()
    for left, right in _MATH_DELIMITERS:
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            return answer[len(left) : len(answer) - len(right)].strip()
    return answer


def brace_depth(text: str) -> int:
    """Maximum nesting depth of unescaped `{` in `text`."""
    depth = deepest = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth -= 1
        i += 1
    return deepest


def is_gradable(answer: str) -> bool:
    """Worth parsing: non-empty, at most MAX_ANSWER_CHARS characters and MAX_BRACE_DEPTH brace levels."""
    return 0 < len(answer) <= MAX_ANSWER_CHARS and brace_depth(answer) <= MAX_BRACE_DEPTH


def quick_verdict(pred: str, ground_truth: str) -> bool | None:
    """Decide without Math-Verify when it is certain, else None.

    - identical up to whitespace: equivalent;
    - both exact-number expressions (integers, decimals, fractions, powers, factorials):
      `verl_ext.exact_numbers.compare`, exact where both sides are exact (`1/2004!` is not
      `1/2006!`, `142` is `142.0`), a tolerance only against a decimal for a value no decimal can
      write. Other pairs go to Math-Verify.
    """
    from verl_ext.exact_numbers import compare

    a, b = "".join(pred.split()), "".join(ground_truth.split())
    if a and a == b:
        return True
    return compare(a, b)


# ----------------------------------------------------------------------------- Math-Verify (worker side)


def math_verify_equivalent(pred: str, ground_truth: str) -> bool:
    """Math-Verify's verdict, its own (signal-based) timeouts off: call only where time is bounded otherwise.

    Both answers are wrapped in `$...$` so that bare LaTeX (`\\frac{1}{2}`, `50\\%`, intervals)
    is parsed as LaTeX; `verify(gold, pred)` is not symmetric and takes the ground truth first.
    """
    from math_verify import parse, verify

    gold = parse(f"${ground_truth}$", parsing_timeout=None)
    guess = parse(f"${pred}$", parsing_timeout=None)
    if not gold or not guess:
        return False
    return bool(verify(gold, guess, timeout_seconds=None))


def serve_grading_requests(stdin=None, stdout=None) -> None:
    """Worker loop: read JSON lines `[pred, ground_truth]`, answer `true`/`false` lines, until EOF.

    Writes `ready` first, once Math-Verify is imported. Any error is answered `false`.
    """
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import before announcing readiness)

    math_verify_equivalent("1", "1")  # warm the parser
    try:
        stdout.write(b"ready\n")
        stdout.flush()
        for line in stdin:
            try:
                pred, truth = json.loads(line)
                verdict = math_verify_equivalent(pred, truth)
            except Exception:  # noqa: BLE001  (a grading error means "not shown equivalent")
                verdict = False
            stdout.write(b"true\n" if verdict else b"false\n")
            stdout.flush()
    except BrokenPipeError:  # the pool was closed (or gave up on this worker) first: nothing to report
        pass


# ----------------------------------------------------------------------------- Math-Verify (parent side)

_WORKER_CODE = "from verl_ext.reward import serve_grading_requests; serve_grading_requests()"


class GraderWorker:
    """One worker process; used by one thread at a time (the pool hands it out)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
        self._buffer = b""
        self.ready = False
        self.killed = False

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.poll() is None

    def _read_line(self, deadline: float) -> bytes | None:
        """Next line from the worker, or None if the deadline passes or the worker is gone."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        if not self.ready:
            self.ready = self._read_line(time.monotonic() + timeout_s) == b"ready"
        return self.ready

    def grade(self, pred: str, ground_truth: str, timeout_s: float) -> bool | None:
        """The worker's verdict, or None when it missed `timeout_s` or died (then it is killed)."""
        if not self.wait_ready():
            self.kill(reap_in_background=True)
            return None
        try:
            self.proc.stdin.write(json.dumps([pred, ground_truth]).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill(reap_in_background=True)
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        if line not in (b"true", b"false"):
            self.kill(reap_in_background=True)
            return None
        return line == b"true"

    def kill(self, reap_in_background: bool = False) -> None:
        """SIGKILL; the exit is waited for (and the pipes closed) here, or in a background thread: a
        process that was expanding a huge expression can take seconds to release its memory, and the
        caller's time bound must not pay for that."""
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        if reap_in_background:
            threading.Thread(target=self._reap, daemon=True, name="grader-reap").start()
        else:
            self._reap()

    def _reap(self) -> None:
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ask the worker to exit (EOF on its stdin), kill it if it does not."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class GraderPool:
    """Worker processes shared by all threads of this process, sized to the callers' concurrency.

    Contract: a call returns within its `timeout_s`, waiting for a worker included. Callers queue in
    arrival order (FIFO: a caller that has just finished cannot take the worker back ahead of one
    that was waiting). While callers wait and fewer than `max_workers` workers exist, a new worker
    starts in the background, so the pool grows to the number of concurrent callers (one worker each):
    then nobody waits behind a slow answer. SPARE_WORKERS (one) worker is kept ready besides (within
    `max_workers`), so that the caller whose worker was just killed for a hanging answer does not wait
    for a replacement's start-up. A caller that gets no worker before its deadline is graded
    wrong (None). Until the first worker is ready the wait may last STARTUP_TIMEOUT_S instead: a
    process's first start-up (seconds) is not an answer's fault. A killed worker is replaced in the
    background at once.
    """

    def __init__(self, max_workers: int) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r}: must be an integer >= 1")
        self.max_workers = max_workers
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[GraderWorker] = []
        self._waiting: collections.deque[object] = collections.deque()
        self._workers = 0  # started and not dead: idle, busy or starting
        self._starting = 0
        self._busy = 0  # handed out to a caller
        self._ever_ready = False
        self._first_start: float | None = None
        self._closed = False

    @property
    def num_workers(self) -> int:
        """Workers now started (idle, busy or starting)."""
        return self._workers

    def _start_worker(self) -> None:
        """Start one worker in a background thread (caller holds the lock)."""
        self._workers += 1
        self._starting += 1
        if self._first_start is None:
            self._first_start = time.monotonic()
        threading.Thread(target=self._bring_up, daemon=True, name="grader-start").start()

    def _grow(self) -> None:
        """Start workers until there is one per caller in flight (busy or waiting) plus SPARE_WORKERS,
        within `max_workers` (caller holds the lock)."""
        demand = min(self._busy + len(self._waiting) + SPARE_WORKERS, self.max_workers)
        while self._workers < demand and not self._closed:
            self._start_worker()

    def _bring_up(self) -> None:
        worker = None
        try:
            worker = GraderWorker()
            ok = worker.wait_ready()
        except OSError:
            ok = False
        with self._cond:
            self._starting -= 1
            if ok and not self._closed:
                self._idle.append(worker)
                self._ever_ready = True
            else:
                self._workers -= 1
                if worker is not None:
                    worker.kill()
            self._cond.notify_all()

    def _acquire(self, deadline: float) -> GraderWorker | None:
        """The next idle worker once every earlier caller has one, or None past `deadline`."""
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while True:
                    if self._waiting[0] is ticket and self._idle:
                        self._busy += 1
                        return self._idle.pop()
                    self._grow()
                    limit = deadline if self._ever_ready else max(deadline, self._first_start + STARTUP_TIMEOUT_S)
                    remaining = limit - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            finally:
                self._waiting.remove(ticket)
                self._grow()  # the spare: a killed worker's start-up is not waited for
                self._cond.notify_all()

    def grade(self, pred: str, ground_truth: str, timeout_s: float) -> bool | None:
        """The verdict of a worker, or None when no worker was free, or it missed the deadline, within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        worker = self._acquire(deadline)
        if worker is None:
            return None
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # only after the process's first start-up: the answer gets the full bound
                remaining = timeout_s
            elif remaining < MIN_GRADE_S:  # too late to ask: a healthy worker would be killed for nothing
                return None
            return worker.grade(pred, ground_truth, remaining)
        finally:
            with self._cond:
                self._busy -= 1
                keep = worker.alive and not self._closed
                if keep:
                    self._idle.append(worker)
                else:
                    self._workers -= 1
                    self._grow()  # the replacement starts now, its start-up overlapping other work
                self._cond.notify_all()
            if not keep and not worker.killed:
                worker.close()  # the pool was closed while it graded

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_pool: GraderPool | None = None
_pool_lock = threading.Lock()


def _num_workers_from_env() -> int:
    raw = os.environ.get(NUM_WORKERS_ENV, str(DEFAULT_MAX_WORKERS))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{NUM_WORKERS_ENV}={raw!r} is invalid; valid: an integer >= 1") from None
    if value < 1:
        raise ValueError(f"{NUM_WORKERS_ENV}={raw!r} is invalid; valid: an integer >= 1")
    return value


def grader_pool() -> GraderPool:
    """This process's pool (a forked child gets its own, never its parent's pipes)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = GraderPool(_num_workers_from_env())
        return _pool


def configure_grader(max_workers: int) -> None:
    """Allow up to `max_workers` worker processes from now on (closes the current ones)."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool.pid == os.getpid():
            _pool.close()
        _pool = GraderPool(max_workers)


@atexit.register
def _close_pool() -> None:
    if _pool is not None and _pool.pid == os.getpid():
        _pool.close()


# ----------------------------------------------------------------------------- grading


def _accepted(ground_truth) -> list[str]:
    """A ground truth as a list of accepted answers: a string, or a list / tuple / array of strings."""
    if ground_truth is None:
        return []
    if isinstance(ground_truth, (str, int, float)):
        return [str(ground_truth)]
    return [str(g) for g in ground_truth if g is not None]


def _grade_one(pred: str, truth: str, timeout_s: float) -> bool:
    truth = normalize_answer(extract_boxed_answer(truth) or truth)
    if not is_gradable(truth):
        return False
    verdict = quick_verdict(pred, truth)
    if verdict is not None:
        return verdict
    return bool(grader_pool().grade(pred, truth, float(timeout_s)))


def grade_answer(pred: str | None, ground_truth, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Is the extracted answer `pred` equivalent to `ground_truth`? Never raises; returns within ~`timeout_s`.

    `ground_truth` is a string, or a sequence of accepted answers (any one suffices; a problem
    with two accepted answers). Order: pre-checks (`is_gradable`), `quick_verdict`, then
    Math-Verify in a worker process killed after `timeout_s` seconds per accepted answer (a
    timeout or a crash grades the answer wrong). The time bound excludes the start-up of a
    worker (seconds, once per process and after each kill). A `timeout_s` that is not a finite
    number > 0 is a configuration error (ConfigError naming it), not a wrong answer.
    """
    from verl_ext.core.checks import check_number

    check_number(timeout_s, "reward timeout_s", low=0, low_open=True)
    try:
        if pred is None:
            return False
        pred = normalize_answer(str(pred))
        if not is_gradable(pred):
            return False
        return any(_grade_one(pred, truth, timeout_s) for truth in _accepted(ground_truth))
    except Exception:
        logger.warning("grading failed; scored as wrong", exc_info=True)
        return False


def is_correct(response: str, ground_truth, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Does `response`'s final answer (`extract_answer`) match `ground_truth` (see `grade_answer`)? Raises only
    for a bad `timeout_s` (ConfigError), never for an answer."""
    from verl_ext.core.checks import ConfigError

    try:
        return grade_answer(extract_answer(response), ground_truth, timeout_s)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001
        return False


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs,
) -> dict:
    """verl reward: {"score": +1.0 if correct else -1.0, "acc": correct, "pred": extracted answer or ""}.

    Same keys for every response (verl stacks them into arrays). `extra_info["accepted_answers"]`
    (written by `verl_ext.data_prep`), when present and non-empty, lists every accepted answer.
    `timeout_s` can be set from `reward.custom_reward_function.reward_kwargs.timeout_s`; other
    keyword arguments verl passes (reward router address, ...) are ignored. Every data source
    is graded the same way.
    """
    try:
        pred = extract_answer(solution_str)
        accepted = (extra_info or {}).get("accepted_answers") if isinstance(extra_info, dict) else None
        truths = ground_truth if accepted is None or len(accepted) == 0 else accepted
    except Exception:  # noqa: BLE001
        pred, truths = None, ground_truth
    correct = grade_answer(pred, truths, timeout_s)
    return {"score": SCORE_CORRECT if correct else SCORE_WRONG, "acc": correct, "pred": (pred or "")[:MAX_ANSWER_CHARS]}


def grade_many(
    responses: list[str],
    ground_truths: list[str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_threads: int | None = None,
    show_progress: bool = False,
) -> list[bool]:
    """`is_correct` over pairs, `num_threads` at a time (default: the pool's maximum worker count)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    threads = num_threads or grader_pool().max_workers
    with ThreadPoolExecutor(max_workers=threads) as executor:
        results = executor.map(lambda pair: is_correct(pair[0], pair[1], timeout_s), zip(responses, ground_truths))
        if show_progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(responses), desc="grading", unit="answer")
        return list(results)
