"""Size of a generation job and its time to completion, printed before and during long runs.

Pure functions, no I/O: the commands print what they return.
"""

from __future__ import annotations


def job_size(problems: int, samples: int, max_new_tokens: int) -> tuple[int, int]:
    """(responses, most tokens generated) = (P·n, P·n·max_new_tokens) for P problems of n samples each."""
    responses = problems * samples
    return responses, responses * max_new_tokens


def size_line(problems: int, samples: int, max_new_tokens: int) -> str:
    """`8 problems x 4 samples x 32 max tokens = 32 responses, at most 1,024 tokens`."""
    responses, tokens = job_size(problems, samples, max_new_tokens)
    return (f"{problems:,} problems x {samples:,} samples x {max_new_tokens:,} max tokens = "
            f"{responses:,} responses, at most {tokens:,} tokens")


def eta_seconds(done: int, total: int, elapsed_s: float) -> float:
    """Seconds left if the rest goes at the rate so far: elapsed · (total − done) / done (done > 0)."""
    if done <= 0:
        raise ValueError(f"done={done}: need at least one finished item to estimate a rate")
    return elapsed_s * max(total - done, 0) / done


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 20 s`, `2 h 05 min`."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def eta_line(done: int, total: int, elapsed_s: float) -> str:
    """`first 32 of 3,200 responses in 12.0 s: about 19 min 48 s left`."""
    return (f"first {done:,} of {total:,} responses in {elapsed_s:.1f} s: "
            f"about {format_duration(eta_seconds(done, total, elapsed_s))} left")
