"""Built-in seeded arithmetic task with verifiable integer answers.

`arithmetic_problems(n, seed, difficulty)` returns `n` problems such as
"Compute 12 + 35. Put the final answer in \\boxed{}." with answer "47". The
expression uses ASCII operators (`+ - * /`) and standard precedence; every
answer is an exact integer (division only where it divides evenly).

Difficulty levels:

| level | operands | numbers | operators | parentheses |
|---|---|---|---|---|
| 1 | 2 | 1-9 | + | no |
| 2 | 2 | 1-20 | + - * (never negative) | no |
| 3 | 2 | 1-99 | + - (never negative) | no |
| 4 | 3 | 1-20 | + - * | no |
| 5 | 3 | 2-99 | + - * | one group, e.g. (a + b) * c |
| 6 | 4 | 2-99, some negative | + - * | yes |
| 7 | 5 (fewer when a divisor replaces a subtree) | 2-99, some negative | + - * / (each division exact) | nested |

Level 1 is for a small (135M) instruct model: SmolLM2-135M-Instruct sampled at
temperature 1 gets about a quarter of single-digit sums right (measured on
this project's 2-core CPU), so most groups of 4-8 samples are mixed and GRPO
has a signal, but GRPO lifts it to ~97% held-out within 10 steps (mostly by
learning the answer format). Level 2 mixes sums, differences and products of
numbers up to 20: greedy held-out accuracy ~21% (200 problems, 32 tokens) at
the start; the task of the batching ablation (docs/results/batching_ablation.md).
At level 3 it gets 7% right (greedy, 48 tokens).
Answers are kept within |answer| <= 10^6.

Deterministic: the same (n, seed, difficulty) gives the same list in every
run and on every machine (`random.Random` seeded with a string, so
PYTHONHASHSEED does not matter), and the first k problems of n > k are the
problems for n = k.

Simplifications: integers only, no word problems, no dedup across problems.

Try it:
    from tokencredit.data import arithmetic_problems
    for p in arithmetic_problems(3, seed=0, difficulty=2):
        print(p.id, p.prompt, p.answer)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

from tokencredit.data.files import Problem

QUESTION = "Compute {expr}. Put the final answer in \\boxed{{}}."
MAX_ABS_ANSWER = 10**6


@dataclass(frozen=True)
class _Level:
    operands: int
    low: int
    high: int
    ops: str
    parens: bool  # random tree (rendered with parentheses) vs flat a op b op c
    negatives: bool
    min_depth: int = 0  # required nesting depth of parentheses
    stream: int = 0  # seeds the problem stream; levels 3-7 keep the streams they had as levels 2-6


LEVELS: dict[int, _Level] = {
    1: _Level(operands=2, low=1, high=9, ops="+", parens=False, negatives=False, stream=1),
    2: _Level(operands=2, low=1, high=20, ops="+-*", parens=False, negatives=False, stream=7),
    3: _Level(operands=2, low=1, high=99, ops="+-", parens=False, negatives=False, stream=2),
    4: _Level(operands=3, low=1, high=20, ops="+-*", parens=False, negatives=False, stream=3),
    5: _Level(operands=3, low=2, high=99, ops="+-*", parens=True, negatives=False, min_depth=1, stream=4),
    6: _Level(operands=4, low=2, high=99, ops="+-*", parens=True, negatives=True, min_depth=1, stream=5),
    7: _Level(operands=5, low=2, high=99, ops="+-*/", parens=True, negatives=True, min_depth=2, stream=6),
}

# an expression is an int leaf or (op, left, right)
Expr = Union[int, tuple]
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def evaluate(e: Expr) -> Fraction:
    """Exact value of an expression tree."""
    if isinstance(e, int):
        return Fraction(e)
    op, a, b = e
    x, y = evaluate(a), evaluate(b)
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y  # ZeroDivisionError is caught by the generator


def render(e: Expr) -> str:
    """Infix text with only the parentheses precedence requires."""
    return _render(e)[0]


def _render(e: Expr) -> tuple[str, int]:
    """(text, nesting depth of grouping parentheses) of an expression tree;
    a negative literal is written `(-7)`, which does not count as grouping."""
    if isinstance(e, int):
        return (f"({e})" if e < 0 else str(e)), 0
    op, a, b = e
    (ta, da), (tb, db) = _render(a), _render(b)
    if not isinstance(a, int) and _PREC[a[0]] < _PREC[op]:
        ta, da = f"({ta})", da + 1
    # right operand: parenthesise at equal precedence too, since a - (b - c) != a - b - c
    if not isinstance(b, int) and _PREC[b[0]] <= _PREC[op]:
        tb, db = f"({tb})", db + 1
    return f"{ta} {op} {tb}", max(da, db)


def _number(rng: random.Random, lv: _Level) -> int:
    x = rng.randint(lv.low, lv.high)
    return -x if lv.negatives and rng.random() < 0.2 else x


def _random_tree(rng: random.Random, leaves: list[int], ops: str) -> Expr:
    """Random binary tree over `leaves` (in order); every division is exact."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    op = rng.choice(ops)
    left, right = _random_tree(rng, leaves[:cut], ops), _random_tree(rng, leaves[cut:], ops)
    if op == "/":
        dividend = int(evaluate(left))  # an integer: divisions below are exact too
        divisor = int(evaluate(right))
        if divisor == 0 or dividend % divisor != 0:
            divisors = [d for d in range(2, 100) if dividend != 0 and dividend % d == 0]
            if divisors:
                right = rng.choice(divisors)  # divisor replaces the right subtree
            else:
                op = rng.choice(ops.replace("/", ""))
    return (op, left, right)


def _flat_tree(ops: list[str], nums: list[int]) -> Expr:
    """Tree of `n0 op0 n1 op1 n2 ...` under standard precedence (left-assoc)."""
    terms: list[Expr] = [nums[0]]
    joins: list[str] = []
    for op, x in zip(ops, nums[1:]):
        if op in "*/":
            terms[-1] = (op, terms[-1], x)
        else:
            joins.append(op)
            terms.append(x)
    tree = terms[0]
    for op, t in zip(joins, terms[1:]):
        tree = (op, tree, t)
    return tree


def _candidate(rng: random.Random, lv: _Level) -> Expr:
    nums = [_number(rng, lv) for _ in range(lv.operands)]
    if lv.parens:
        return _random_tree(rng, nums, lv.ops)
    ops = [rng.choice(lv.ops) for _ in range(lv.operands - 1)]
    if lv.operands == 2 and ops[0] == "-" and nums[0] < nums[1]:
        nums.reverse()  # two-operand levels never go negative
    return _flat_tree(ops, nums)


def _acceptable(e: Expr, lv: _Level) -> int | None:
    """Integer answer if the expression fits the level, else None."""
    try:
        v = evaluate(e)
    except ZeroDivisionError:
        return None
    if v.denominator != 1 or abs(v) > MAX_ABS_ANSWER:
        return None
    if _render(e)[1] < lv.min_depth:
        return None
    return int(v)


def arithmetic_problems(n: int, seed: int, difficulty: int = 1) -> list[Problem]:
    """`n` arithmetic problems at `difficulty` 1..7 (see the module docstring).

    Ids are `arith-d{difficulty}-s{seed}-{index}`; answers are integer strings.
    """
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lv = LEVELS[difficulty]
    rng = random.Random(f"tokencredit-arithmetic-d{lv.stream}-s{seed}")
    out: list[Problem] = []
    while len(out) < n:
        e = _candidate(rng, lv)
        ans = _acceptable(e, lv)
        if ans is None:
            continue
        pid = f"arith-d{difficulty}-s{seed}-{len(out)}"
        out.append(Problem(prompt=QUESTION.format(expr=render(e)), answer=str(ans), id=pid))
    return out
