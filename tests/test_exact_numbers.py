"""verl_ext.exact_numbers: exact values against an independent computation, near-miss traps through the reward."""

from __future__ import annotations

import math
import random
import time
from fractions import Fraction

import pytest

from verl_ext.exact_numbers import MAX_BITS, TOO_LARGE, compare, decimal_matches, parse_exact, terminates
from verl_ext.reward import is_correct

# (response, ground truth): a float comparison with a tolerance calls each pair equal; none is.
NEAR_MISS_TRAPS = [
    ("\\boxed{\\frac{1}{2004!}}", "\\frac{1}{2006!}"),
    ("\\boxed{1/2004!}", "1/2006!"),
    ("\\boxed{\\frac{1}{10^{30}}}", "\\frac{2}{10^{30}}"),
    ("\\boxed{10^{-30}}", "2\\cdot 10^{-30}"),
    ("\\boxed{0}", "10^{-30}"),
    ("\\boxed{0.0}", "10^{-30}"),
    ("\\boxed{0.000000000000000000000000000001}", "0.000000000000000000000000000002"),
    ("\\boxed{100000000000000000001}", "100000000000000000000"),
    ("\\boxed{10^{20}+1}", "10^{20}"),
    ("\\boxed{2^{100}}", "2^{100}+1"),
    ("\\boxed{\\frac{2^{100}+1}{2^{100}}}", "1"),
    ("\\boxed{1.0000001}", "1"),
    ("\\boxed{1.0000001}", "\\frac{3}{3}"),
    ("\\boxed{2005!}", "2006!"),
    ("\\boxed{\\frac{1}{3}}", "0.333"),
    ("\\boxed{\\frac{2}{3}}", "0.6667"),
    ("\\boxed{0.33333343}", "\\frac{1}{3}"),
    ("\\boxed{(10^{8})!}", "5"),
    ("\\boxed{9^{9^{9}}}", "9^{9^{8}}"),
]

# must stay equivalent
EXACT_EQUIVALENT = [
    ("\\boxed{\\frac{1}{2006!}}", "1/2006!"),
    ("\\boxed{\\frac{2}{10^{30}}}", "2\\cdot10^{-30}"),
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{3!}", "6"),
    ("\\boxed{(2^{3})^{2}}", "64"),
    ("\\boxed{10^{-3}}", "0.001"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("\\boxed{0.3333333}", "\\frac{1}{3}"),
    ("\\boxed{0.666667}", "\\frac{2}{3}"),
    ("\\boxed{\\dfrac{6}{4}}", "1.5"),
    ("\\boxed{142}", "142.0"),
    ("\\boxed{\\frac{10!}{9!}}", "10"),
    ("\\boxed{2 \\times 3 + 4}", "10"),
    ("\\boxed{\\left(\\frac{1}{2}\\right)^{2}}", "0.25"),
]


@pytest.mark.parametrize("response,truth", NEAR_MISS_TRAPS)
def test_near_miss_traps_are_wrong(response, truth):
    assert is_correct(response, truth, timeout_s=5.0) is False


@pytest.mark.parametrize("response,truth", EXACT_EQUIVALENT)
def test_exact_equivalents_stay_right(response, truth):
    assert is_correct(response, truth, timeout_s=5.0) is True


# ----------------------------------------------------------------------------- against Python's own arithmetic


def random_expression(rng: random.Random, depth: int = 0) -> tuple[str, Fraction]:
    """(LaTeX, exact value computed by Python's Fraction / math.factorial), built from the same tree."""
    if depth >= 3 or rng.random() < 0.3:
        n = rng.randrange(0, 30)
        return str(n), Fraction(n)
    kind = rng.choice(["+", "-", "*", "frac", "pow", "fact", "paren", "neg"])
    a, x = random_expression(rng, depth + 1)
    if kind == "fact":
        n = rng.randrange(0, 25)
        return f"{n}!", Fraction(math.factorial(n))
    if kind == "paren":
        return f"({a})", x
    if kind == "neg":
        return f"-({a})", -x
    if kind == "pow":
        e = rng.randrange(-3, 4)
        if x == 0 and e < 0:
            e = 2
        return f"({a})^{{{e}}}", x ** e
    b, y = random_expression(rng, depth + 1)
    if kind == "frac":
        if y == 0:
            b, y = "1", Fraction(1)
        return f"\\frac{{{a}}}{{{b}}}", x / y
    op = {"+": "+", "-": "-", "*": " \\cdot "}[kind]
    return f"({a}){op}({b})", x + y if kind == "+" else x - y if kind == "-" else x * y


def test_values_match_python_arithmetic():
    rng = random.Random(0)
    for _ in range(500):
        text, value = random_expression(rng)
        parsed = parse_exact(text)
        assert parsed is not None and parsed != TOO_LARGE, text
        assert parsed.value == value, text


def test_decimal_rule_matches_rounding():
    """A decimal stands for a non-terminating p/q iff it is p/q rounded to its places, with >= 6 significant digits."""
    rng = random.Random(1)
    for _ in range(300):
        q = rng.choice([3, 7, 9, 11, 13, 21])
        p = rng.randrange(1, 5 * q)
        x = Fraction(p, q)
        if terminates(x):  # p a multiple of q's other factors: the exact rule applies (tested below)
            continue
        places = rng.randrange(1, 10)
        rounded = round(x, places)  # Python's own rounding of the exact value
        wiggle = rng.choice([0, 0, 1, -1])
        d = rounded + Fraction(wiggle, 10 ** places)
        if d <= 0:
            continue
        text = f"{d.numerator * 10 ** places // d.denominator}"
        text = text.rjust(places + 1, "0")
        text = f"{text[:-places]}.{text[-places:]}"
        parsed = parse_exact(text)
        assert parsed.value == d, text
        significant = len(text.replace(".", "").lstrip("0"))
        expected = wiggle == 0 and significant >= 6
        assert decimal_matches(parsed, x) is expected, (text, x)


def test_terminating_values_compare_exactly_with_decimals():
    assert compare("0.125", "\\frac{1}{8}") is True
    assert compare("0.1250001", "\\frac{1}{8}") is False
    assert compare("2.5", "\\frac{5}{2}") is True


def test_not_exact_numbers_are_left_to_math_verify():
    for a in ["x", "\\sqrt{2}", "\\pi", "1,000", "2^{1/2}", "5!!", "10^\\circ", "2.5/3", "(1,2)", ""]:
        assert compare(a, "1") is None, a


def test_huge_values_are_refused_quickly():
    for text in ["9^{9^{9}}", "(10^{8})!", "(10^{1000})!", "2^{10^{6}}", "\\frac{1}{(2^{99999})^{2}}",
                 "10000!", "10^{40000}"]:
        start = time.perf_counter()
        assert parse_exact(text) == TOO_LARGE, text
        assert time.perf_counter() - start < 0.2, text
    assert parse_exact("2006!").value == math.factorial(2006)  # inside the guard
    assert parse_exact(f"2^{{{MAX_BITS - 1}}}").value == 2 ** (MAX_BITS - 1)
