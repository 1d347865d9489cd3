"""Exact comparison of answers that are numbers: no tolerance where both sides are exact.

Math-Verify compares numbers as floats with a tolerance, so `1/2004!` "equals" `1/2006!` and
`\\frac{1}{10^{30}}` "equals" `\\frac{2}{10^{30}}`: a policy rewarded for such near-misses learns wrong
answers. Here an answer written as an arithmetic expression over integers (and decimal literals) is
evaluated to an exact rational (`fractions.Fraction`):

    number   := digits | digits.digits                      (a decimal literal is an exact rational too)
    atom     := number | (expr) | \\left( expr \\right) | {expr} | \\frac{expr}{expr} (also \\dfrac, \\tfrac,
                \\frac12 with one-digit arguments)
    postfix  := atom !*                                       (factorial of a non-negative integer)
    power    := postfix [^ exponent]                          (exponent: a {group} or one digit; an integer)
    unary    := (+|-)* power
    term     := unary ((* | / | \\cdot | \\times | \\div) unary)*
    expr     := term ((+|-) term)*

Anything else (a variable, \\sqrt, \\pi, a comma, a fractional exponent, `!!`, `^\\circ`) is "not an exact
number" and `compare` returns None: Math-Verify decides.

Verdict of `compare(a, b)` when both sides evaluate (x = value of a, y = value of b):

- both sides free of decimal literals, or both a decimal literal: equal iff x == y, exactly;
- one side a decimal literal d (k digits after the point, s significant digits) and the other an
  exact value x: if x has a finite decimal expansion (denominator 2^i 5^j), equal iff x == d;
  otherwise (1/3, 2/3: no decimal can write them) equal iff s >= MIN_SIGNIFICANT_DIGITS and
  |x - d| <= 10^-k / 2 (d is x rounded to k places). The only tolerance, and only against a decimal;
- a decimal inside a larger expression on a side with another number (`2.5/3` vs `1/3`): None.

Guard for huge values: every intermediate integer is kept under MAX_BITS bits, checked before it is
computed (a factorial's size from lgamma, a power's from the exponent times the base's bits). An
expression past the guard is `TOO_LARGE`: `compare` calls such a pair unequal (written identically it
never gets here: the caller checks identity first), because no cheap exact test exists and a rounded
one is exactly what this module replaces.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_BITS = 100_000  # about 30,000 decimal digits: 2006! has 19,000 bits
MAX_TOKENS = 400  # longer expressions are not evaluated here
MIN_SIGNIFICANT_DIGITS = 6  # a decimal accepted for a non-terminating value must carry this many


class NotExact(Exception):
    """The text is not an expression of this grammar."""


class TooLarge(Exception):
    """An intermediate value would exceed MAX_BITS bits."""


TOO_LARGE = "too large"

_TOKEN = re.compile(
    r"\s+|\\[,;:! ]|\\left\(|\\right\)|\\[dt]?frac|\\cdot|\\times|\\div|\d+\.\d+|\d+|[-+*/^!(){}]"
)
_SPACES = re.compile(r"\s+|\\[,;:! ]")


def tokenize(text: str) -> list[str]:
    """Tokens of `text`, or NotExact when a character is outside the grammar (spacing commands dropped)."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise NotExact(text[pos:pos + 20])
        tok = m.group(0)
        pos = m.end()
        if _SPACES.fullmatch(tok):
            continue
        tokens.append({"\\left(": "(", "\\right)": ")", "\\dfrac": "\\frac", "\\tfrac": "\\frac",
                       "\\cdot": "*", "\\times": "*", "\\div": "/"}.get(tok, tok))
        if len(tokens) > MAX_TOKENS:
            raise NotExact("too many tokens")
    return tokens


def _bits(x: Fraction) -> int:
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _guard(x: Fraction) -> Fraction:
    if _bits(x) > MAX_BITS:
        raise TooLarge
    return x


def factorial(x: Fraction) -> Fraction:
    """n! for a non-negative integer n, TooLarge when log2(n!) > MAX_BITS (checked before computing)."""
    if x.denominator != 1 or x < 0:
        raise NotExact("factorial of a non-integer or a negative number")
    n = x.numerator
    if n > 10**6 or (n > 2 and math.lgamma(n + 1) / math.log(2) > MAX_BITS):
        raise TooLarge
    return Fraction(math.factorial(n))


def power(base: Fraction, exponent: Fraction) -> Fraction:
    """base^exponent for an integer exponent, TooLarge when |exponent|·log2(max(|p|, q)) > MAX_BITS (base = p/q)."""
    if exponent.denominator != 1:
        raise NotExact("a non-integer exponent")
    e = exponent.numerator
    if base == 0:
        if e < 0:
            raise NotExact("0 to a negative power")
        return Fraction(1 if e == 0 else 0)
    if abs(base) == 1:
        return base ** e
    if abs(e) * math.log2(max(abs(base.numerator), base.denominator)) > MAX_BITS:
        raise TooLarge
    return _guard(base ** e)


@dataclass
class Parsed:
    value: Fraction
    decimals: int  # decimal literals in the expression
    numbers: int  # number literals in the expression
    places: int  # digits after the point of the (single) decimal literal
    significant: int  # its significant digits


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0
        self.decimals = self.numbers = self.places = self.significant = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise NotExact(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> Fraction:
        value = self.expr()
        if self.peek() is not None:
            raise NotExact(f"unexpected {self.peek()!r}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _guard(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            if op == "/" and rhs == 0:
                raise NotExact("division by zero")
            value = _guard(value * rhs if op == "*" else value / rhs)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()
            value = self.unary()
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.postfix()
        if self.peek() != "^":
            return base
        self.take("^")
        if self.peek() == "{":
            exponent = self.group()
        else:
            tok = self.take()
            if not (tok.isdigit() and len(tok) == 1):  # LaTeX: `2^10` is 2^1 followed by 0
                raise NotExact("an exponent must be a {group} or one digit")
            self.numbers += 1
            exponent = Fraction(int(tok))
        if self.peek() in ("^", "!"):
            raise NotExact("ambiguous power")
        return power(base, exponent)

    def postfix(self) -> Fraction:
        value = self.atom()
        count = 0
        while self.peek() == "!":
            self.take()
            count += 1
        if count > 1:
            raise NotExact("`!!` is a double factorial")
        return factorial(value) if count else value

    def group(self) -> Fraction:
        self.take("{")
        value = self.expr()
        self.take("}")
        return value

    def _digit_argument(self) -> Fraction:
        """`\\frac12`: a brace-less argument is one digit."""
        tok = self.peek()
        if tok == "{":
            return self.group()
        if tok is None or not tok.isdigit():
            raise NotExact("bad \\frac argument")
        self.numbers += 1
        self.tokens[self.i] = tok[1:]
        if not self.tokens[self.i]:
            self.i += 1
        return Fraction(int(tok[0]))

    def atom(self) -> Fraction:
        tok = self.peek()
        if tok is None:
            raise NotExact("unexpected end")
        if tok == "(":
            self.take()
            value = self.expr()
            self.take(")")
            return value
        if tok == "{":
            return self.group()
        if tok == "\\frac":
            self.take()
            num = self._digit_argument()
            den = self._digit_argument()
            if den == 0:
                raise NotExact("division by zero")
            return _guard(num / den)
        if tok[0].isdigit():
            self.take()
            self.numbers += 1
            if "." in tok:
                self.decimals += 1
                whole, frac = tok.split(".")
                self.places = len(frac)
                self.significant = len((whole + frac).lstrip("0")) or 1
            if len(tok) > MAX_BITS // 3:
                raise TooLarge
            return Fraction(tok)
        raise NotExact(f"unexpected {tok!r}")


def parse_exact(text: str) -> Parsed | None | str:
    """`Parsed` for an expression of the grammar, None when it is not one, TOO_LARGE past the guard."""
    try:
        parser = _Parser(tokenize(text))
        if not parser.tokens:
            return None
        value = parser.parse()
    except NotExact:
        return None
    except TooLarge:
        return TOO_LARGE
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return Parsed(value, parser.decimals, parser.numbers, parser.places, parser.significant)


def is_decimal_literal(p: Parsed) -> bool:
    return p.decimals == 1 and p.numbers == 1


def terminates(x: Fraction) -> bool:
    """x has a finite decimal expansion: its reduced denominator is 2^i 5^j."""
    d = x.denominator
    for prime in (2, 5):
        while d % prime == 0:
            d //= prime
    return d == 1


def decimal_matches(d: Parsed, x: Fraction) -> bool:
    """The decimal literal `d` stands for exact `x` (see the module docstring for the rule)."""
    if terminates(x):
        return d.value == x
    return d.significant >= MIN_SIGNIFICANT_DIGITS and abs(x - d.value) <= Fraction(1, 2 * 10 ** d.places)


def compare(a: str, b: str) -> bool | None:
    """Exact verdict on two answers when both are exact-number expressions, else None (see module docstring)."""
    pa, pb = parse_exact(a), parse_exact(b)
    if pa is None or pb is None:
        return None
    if pa == TOO_LARGE or pb == TOO_LARGE:
        return False
    if pa.decimals == 0 and pb.decimals == 0:
        return pa.value == pb.value
    if is_decimal_literal(pa) and is_decimal_literal(pb):
        return pa.value == pb.value
    if is_decimal_literal(pa) and pb.decimals == 0:
        return decimal_matches(pa, pb.value)
    if is_decimal_literal(pb) and pa.decimals == 0:
        return decimal_matches(pb, pa.value)
    return None
