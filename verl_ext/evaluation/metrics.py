"""Avg@k and unbiased Pass@k, per problem and averaged over problems.

For one problem with n sampled responses of which c are correct:

- Pass@k = 1 − C(n−c, k) / C(n, k)   (Chen et al. 2021): the probability that at least one of k
  responses drawn without replacement from the n is correct; unbiased for the model's pass@k.
- Avg@k  = c / n: the expected fraction correct among k responses drawn from the n (the mean of
  per-subset accuracies over all k-subsets equals c/n); with k = n it is the plain mean accuracy.

A dataset's score is the mean over its problems. verl's own `best@k` bootstrap is biased low
for Pass@k: do not use it for that.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def _check(n: int, c: int, k: int) -> tuple[int, int, int]:
    """(n, c, k) as Python ints; any integer type is accepted (numpy's from pandas counts), bools and floats are not."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be an integer")
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample")
    if not 0 <= c <= n:
        raise ValueError(f"c={c}: number correct must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: must lie in [1, n={n}] (cannot estimate @{k} from {n} samples)")
    return n, c, k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k = 1 − C(n−c, k)/C(n, k), computed as 1 − ∏_{i=n−c+1}^{n} (1 − k/i).

    The product form avoids huge binomials: C(n−c, k)/C(n, k) = ∏_{i=n−c+1}^{n} (i−k)/i.
    When n − c < k every k-subset holds a correct response and Pass@k = 1.
    """
    n, c, k = _check(n, c, k)
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k(n: int, c: int, k: int) -> float:
    """Avg@k = c / n: expected accuracy of k responses drawn without replacement from the n."""
    n, c, k = _check(n, c, k)
    return c / n


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over problems of `pass_at_k(n, c, k)`; `counts` holds (n, c) per problem."""
    if not counts:
        raise ValueError("no problems to average over")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def mean_avg_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over problems of `avg_at_k(n, c, k)`; `counts` holds (n, c) per problem."""
    if not counts:
        raise ValueError("no problems to average over")
    return sum(avg_at_k(n, c, k) for n, c in counts) / len(counts)
