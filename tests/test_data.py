"""Data: built-in arithmetic task, .jsonl/.parquet loading with clear errors, prompts."""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from tokencredit.data import (
    DataError,
    Problem,
    arithmetic_problems,
    build_messages,
    load_problems,
    render_prompt,
)
from tokencredit.rewards import score

MATH500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks" / "math500.jsonl"

# ------------------------------------------------------------------ arithmetic

_QUESTION = re.compile(r"Compute (.+)\. Put the final answer in \\boxed\{\}\.")


def _eval(node: ast.AST) -> Fraction:
    """Independent evaluator for + - * / and unary minus on integer literals;
    asserts every division is exact."""
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            assert b != 0 and (a / b).denominator == 1, "inexact division"
            return a / b
    raise AssertionError(f"unexpected syntax {ast.dump(node)}")


def _expression(p: Problem) -> str:
    m = _QUESTION.fullmatch(p.prompt)
    assert m, p.prompt
    return m.group(1)


def test_arithmetic_known_values():
    # pinned output: changing the generator changes every seeded experiment
    p = arithmetic_problems(3, seed=0, difficulty=1)
    assert [x.prompt for x in p] == [
        "Compute 6 + 7. Put the final answer in \\boxed{}.",
        "Compute 6 + 3. Put the final answer in \\boxed{}.",
        "Compute 9 + 2. Put the final answer in \\boxed{}.",
    ]
    assert [x.answer for x in p] == ["13", "9", "11"]  # checked by hand
    assert [x.id for x in p] == ["arith-d1-s0-0", "arith-d1-s0-1", "arith-d1-s0-2"]
    r = arithmetic_problems(4, seed=0, difficulty=2)
    assert [x.prompt.split(".")[0] for x in r] == ["Compute 9 + 14", "Compute 19 - 14", "Compute 7 * 5", "Compute 19 - 2"]
    assert [x.answer for x in r] == ["23", "5", "35", "17"]  # checked by hand
    # level 3 (two-digit +/-, level 2 before single-digit + - * was inserted) keeps its problem stream
    q = arithmetic_problems(3, seed=0, difficulty=3)
    assert [x.prompt for x in q] == [
        "Compute 47 + 63. Put the final answer in \\boxed{}.",
        "Compute 60 - 47. Put the final answer in \\boxed{}.",
        "Compute 72 + 5. Put the final answer in \\boxed{}.",
    ]
    assert [x.answer for x in q] == ["110", "13", "77"]  # checked by hand


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6, 7])
def test_arithmetic_deterministic_and_seeded(difficulty):
    a = arithmetic_problems(40, seed=7, difficulty=difficulty)
    assert a == arithmetic_problems(40, seed=7, difficulty=difficulty)
    assert a[:10] == arithmetic_problems(10, seed=7, difficulty=difficulty)  # prefix-stable
    b = arithmetic_problems(40, seed=8, difficulty=difficulty)
    assert [p.prompt for p in a] != [p.prompt for p in b]
    assert len({p.id for p in a}) == 40
    assert all(p.id.startswith(f"arith-d{difficulty}-s7-") for p in a)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6, 7])
def test_arithmetic_answers_correct(difficulty):
    for p in arithmetic_problems(200, seed=1, difficulty=difficulty):
        expr = _expression(p)
        value = _eval(ast.parse(expr, mode="eval"))
        assert value.denominator == 1 and str(value.numerator) == p.answer, p
        assert abs(value) <= 10**6


def test_arithmetic_levels_shape():
    for p in arithmetic_problems(100, seed=2, difficulty=1):
        a, op, b = _expression(p).split()
        assert op == "+" and 1 <= int(a) <= 9 and 1 <= int(b) <= 9
    ops2 = set()
    for p in arithmetic_problems(100, seed=2, difficulty=2):
        a, op, b = _expression(p).split()
        ops2.add(op)
        assert op in "+-*" and 1 <= int(a) <= 20 and 1 <= int(b) <= 20 and int(p.answer) >= 0
    assert ops2 == {"+", "-", "*"}
    for p in arithmetic_problems(100, seed=2, difficulty=3):
        expr = _expression(p)
        a, op, b = expr.split()
        assert op in "+-" and 1 <= int(a) <= 99 and 1 <= int(b) <= 99 and int(p.answer) >= 0
    for p in arithmetic_problems(100, seed=2, difficulty=4):
        assert len(re.findall(r"\d+", _expression(p))) == 3 and "(" not in p.prompt
    assert all("(" in _expression(p) for p in arithmetic_problems(50, seed=2, difficulty=5))
    assert any("/" in _expression(p) for p in arithmetic_problems(50, seed=2, difficulty=7))


@pytest.mark.parametrize("bad", [0, 8, -1])
def test_arithmetic_difficulty_out_of_range(bad):
    with pytest.raises(ValueError, match="difficulty"):
        arithmetic_problems(3, seed=0, difficulty=bad)


def test_arithmetic_answers_score_one():
    for d in (1, 2, 4, 7):
        for p in arithmetic_problems(4, seed=3, difficulty=d):
            assert score(f"The result is \\boxed{{{p.answer}}}.", p.answer) == 1.0
            assert score(f"\\boxed{{{int(p.answer) + 1}}}", p.answer) == 0.0


# ------------------------------------------------------------------ files


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    f = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            json.dumps({"prompt": "What is 2+3?", "answer": "5", "id": "q1"}),
            "",
            "   ",
            json.dumps({"prompt": "Half of 3?", "answer": 1.5}),
            json.dumps({"prompt": "Big?", "answer": 12345678901234567890}),
        ],
    )
    assert load_problems(f) == [
        Problem("What is 2+3?", "5", "q1"),
        Problem("Half of 3?", "1.5", "train-1"),
        Problem("Big?", "12345678901234567890", "train-2"),
    ]
    assert [p.answer for p in load_problems(str(f), limit=2)] == ["5", "1.5"]
    assert load_problems(f, limit=0) == []


def test_problem_field_fallback_and_explicit_fields(tmp_path):
    f = _write_jsonl(tmp_path / "bench.jsonl", [json.dumps({"problem": "P?", "answer": "7", "question": "Q?", "gold": 8})])
    assert load_problems(f) == [Problem("P?", "7", "bench-0")]
    assert load_problems(f, prompt_field="question", answer_field="gold") == [Problem("Q?", "8", "bench-0")]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"problem": ["1+1?", "2*3?"], "answer": [2, 6]}), f)
    assert load_problems(f) == [Problem("1+1?", "2", "train-0"), Problem("2*3?", "6", "train-1")]
    assert len(load_problems(f, limit=1)) == 1

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["ok", "fine"], "answer": ["1", None]}), bad)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: empty field 'answer'"):
        load_problems(bad)


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b", answer: 2}'], r"bad\.jsonl:3: invalid JSON"),
        (['{"prompt": "a", "answer": "1"}', '["prompt", "answer"]'], r"bad\.jsonl:2: expected a JSON object, got list"),
        (['{"prompt": "a", "solution": "x"}'], r"bad\.jsonl:1: missing field 'answer' \(have: prompt, solution\)"),
        (['{"question": "a", "answer": "1"}'], r"bad\.jsonl:1: missing field 'prompt' or 'problem' \(have: question, answer\)"),
        (['{"prompt": "a", "answer": ""}'], r"bad\.jsonl:1: empty field 'answer'"),
        (['{"prompt": "  ", "answer": "1"}'], r"bad\.jsonl:1: empty field 'prompt'"),
        (['{"prompt": 5, "answer": "1"}'], r"bad\.jsonl:1: field 'prompt' must be a string, got int"),
        (['{"prompt": "a", "answer": [1]}'], r"bad\.jsonl:1: field 'answer' must be a string or a number, got list"),
        (["", "  "], r"bad\.jsonl: no rows \(empty file\)"),
    ],
)
def test_malformed_jsonl(tmp_path, lines, pattern):
    f = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=pattern) as info:
        load_problems(f)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_problems(tmp_path / "nope.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown extension '\.csv'"):
        load_problems(csv)


def test_invalid_utf8_and_corrupt_parquet(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        load_problems(f)
    g = tmp_path / "junk.parquet"
    g.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read parquet") as info:
        load_problems(g)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not MATH500.exists(), reason="shared benchmark files not present")
def test_reads_math500():
    problems = load_problems(MATH500, limit=3)
    assert len(problems) == 3
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert problems[0].id == "math500-0"
    assert all(p.prompt.rstrip().endswith("\\boxed{}.") for p in problems)
    # the gold verifies against itself once boxed
    assert score(f"\\boxed{{{problems[0].answer}}}", problems[0].answer) == 1.0


# ------------------------------------------------------------------ prompts


class _FakeTokenizer:
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_build_messages():
    assert build_messages("Q?") == [{"role": "user", "content": "Q?"}]
    assert build_messages("Q?", system="S") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q?"},
    ]


def test_render_prompt():
    assert render_prompt(_FakeTokenizer(), "Q?") == "<user>Q?<assistant>"
    assert render_prompt(_FakeTokenizer(), "Q?", system="S") == "<system>S<user>Q?<assistant>"
    no_template = _FakeTokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(no_template, "Q?")


def test_render_prompt_with_tiny_tokenizer():
    tiny = pytest.importorskip("tokencredit.model.tiny")
    text = render_prompt(tiny.build_tiny_tokenizer(), "Compute 2 + 3.")
    assert text == "<|im_start|>user\nCompute 2 + 3.<|im_end|>\n<|im_start|>assistant\n"
