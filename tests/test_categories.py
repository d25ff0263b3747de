"""Token categories (Fig. 4): hand cases for the rules, context handling for
character- and word-piece tokenizations, boosted-mass shares on hand records."""

import json

import pytest

from tokencredit.probes.categories import categorize_pieces, categorize_token, category_mass, write_category_json


@pytest.mark.parametrize(
    "piece,cat",
    [
        ("<|im_start|>", "format"), ("<|im_end|>", "format"), ("</s>", "format"), ("<think>", "format"),
        ("\\boxed", "format"), ("boxed", "format"), (" answer", "format"), ("Final", "format"), (" Step", "format"),
        (".", "format"), (",", "format"), (":", "format"), ("**", "format"), ("###", "format"), ("\n\n", "format"),
        ("", "format"), ("   ", "format"), ("…", "format"),
        ("7", "math"), (" 42", "math"), ("3.14", "math"), ("+", "math"), (" =", "math"), ("^", "math"), ("(", "math"),
        ("{", "math"), ("\\frac", "math"), ("\\sqrt", "math"), ("\\cdot", "math"), ("$", "math"), ("\\(", "math"),
        ("x", "math"), (" n", "math"), ("x^2", "math"), ("×", "math"), ("≤", "math"), ("π", "math"),
        ("the", "reasoning"), (" because", "reasoning"), ("Therefore", "reasoning"), (" a", "reasoning"),
        ("I", "reasoning"), ("ation", "reasoning"), (" don't", "reasoning"),
    ],
)
def test_categorize_token(piece, cat):
    assert categorize_token(piece) == cat


def test_char_level_pieces_take_the_category_of_their_word():
    text = "So answer: 2a + b"
    cats = categorize_pieces(list(text))
    want = {"S": "reasoning", "o": "reasoning", "a": None, "n": "format", ":": "format", "2": "math", "+": "math", "b": "math"}
    got = dict(zip(text, cats))
    assert got["S"] == got["o"] == "reasoning"
    assert cats[3:9] == ["format"] * 6  # "answer": every character of a template word
    assert got[":"] == want[":"] and got["2"] == "math" and got["+"] == "math" and got["b"] == "math"
    assert cats[text.index("2a") + 1] == "math"  # "a" next to a number is a variable
    assert cats[text.index(" ")] == "format"  # whitespace


def test_word_pieces_and_math_mode():
    pieces = ["We", " have", " $", "x", " +", " y", "\\", "le", " three", "$", ".", " The", " answer", " is", " \\", "boxed", "{", "5", "}", "<|im_end|>"]
    cats = categorize_pieces(pieces)
    assert cats[:2] == ["reasoning", "reasoning"]
    assert cats[2:10] == ["math"] * 8  # inside $...$ even the word "three" counts as math
    assert cats[10] == "format"
    assert cats[11] == "reasoning" and cats[12] == "format" and cats[13] == "reasoning"
    assert cats[14:16] == ["format", "format"]  # \boxed split over two pieces
    assert cats[16:19] == ["math"] * 3 and cats[19] == "format"


def test_article_a_stays_reasoning_in_prose():
    cats = categorize_pieces(["It", " is", " a", " cat", "."])
    assert cats == ["reasoning", "reasoning", "reasoning", "reasoning", "format"]


class CharTok:
    """decode([id]) -> chr(id): enough tokenizer for category_mass."""

    def decode(self, ids, **kw):
        return "".join(chr(i) for i in ids)


def _records(text, deltas, row=0, step=1):
    return [{"step": step, "row": row, "position": i, "token_id": ord(c), "delta": d} for i, (c, d) in enumerate(zip(text, deltas))]


def test_category_mass_shares_by_hand():
    # "the 12." -> t,h,e reasoning; ' ' format; 1,2 math; '.' format
    recs = _records("the 12.", [0.1, 0.1, 0.2, 0.05, 0.3, -0.4, 0.25])
    r = category_mass(recs, CharTok())
    # python float64 sums of a few hand deltas (error ~1e-16): approx's default rel 1e-6 only tells categories apart
    assert r["mass"] == pytest.approx({"reasoning": 0.4, "format": 0.3, "math": 0.3})
    assert r["total"] == pytest.approx(1.0)
    assert (r["reasoning"], r["format"], r["math"]) == pytest.approx((0.4, 0.3, 0.3))
    assert r["tokens"] == {"reasoning": 3, "format": 2, "math": 2}
    sup = category_mass(recs, CharTok(), weight="suppressed")
    assert sup["math"] == pytest.approx(1.0)
    cnt = category_mass(recs, CharTok(), weight="count")
    assert cnt["mass"]["math"] == 1.0 and cnt["mass"]["reasoning"] == 3.0


def test_category_mass_compares_two_sets_and_uses_row_context(tmp_path):
    # shuffled record order and two rows: context comes from (step, row) sorted by position
    grpo = _records("so x", [0.5, 0.5, 0.0, 0.0], row=0) + _records("answer", [0.1] * 6, row=1)
    pos_only = _records("so x", [0.0, 0.0, 0.0, 0.2], row=0) + _records("answer", [0.3] * 6, row=1)
    res = category_mass({"grpo": grpo[::-1], "positive_only": pos_only}, CharTok())
    # python float64 on hand deltas (error ~1e-16; parquet keeps float64): approx's default rel 1e-6 is slack
    assert res["grpo"]["reasoning"] == pytest.approx(1.0 / 1.6)
    assert res["grpo"]["format"] == pytest.approx(0.6 / 1.6)
    assert res["positive_only"]["format"] == pytest.approx(1.8 / 2.0)
    assert res["positive_only"]["math"] == pytest.approx(0.2 / 2.0)
    assert res["shift"]["format"] == pytest.approx(0.6 / 1.6 - 0.9)
    # parquet input and the JSON the report reads
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "flip.parquet"
    pq.write_table(pa.Table.from_pylist(grpo), f)
    assert category_mass(f, CharTok())["reasoning"] == pytest.approx(res["grpo"]["reasoning"])
    out = write_category_json(tmp_path / "probes" / "categories.json", res)
    assert set(json.loads(out.read_text())) == {"grpo", "positive_only", "shift"}


def test_category_mass_with_the_tiny_tokenizer():
    from tokencredit.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = tok("The answer is 7.", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    recs = [{"row": 0, "position": i, "token_id": t, "delta": 1.0} for i, t in enumerate(ids)]
    r = category_mass(recs, tok, weight="abs")
    # The(3) reasoning; ' '(3) + answer(6) + '.' + <|im_end|> format; is(2) reasoning; 7 math
    assert r["tokens"] == {"reasoning": 5, "format": 11, "math": 1}


def test_empty_and_bad_weight():
    assert category_mass([], CharTok())["total"] == 0.0
    with pytest.raises(ValueError, match="weight"):
        category_mass([], CharTok(), weight="nope")


def test_polarity_table_gives_both_sets():
    # the polarity probe's table: one row per token, delta_grpo and delta_positive_only columns
    text = "so 7"
    table = {"row": [0] * 4, "position": list(range(4)), "token_id": [ord(c) for c in text],
             "delta_grpo": [0.2, 0.2, 0.0, 0.1], "delta_positive_only": [0.0, 0.0, 0.5, 0.5]}
    r = category_mass(table, CharTok())
    assert set(r) == {"grpo", "positive_only", "shift"}
    # python float64 on hand deltas (error ~1e-16): approx's default rel 1e-6 is slack
    assert r["grpo"]["reasoning"] == pytest.approx(0.8) and r["grpo"]["math"] == pytest.approx(0.2)
    assert r["positive_only"]["format"] == pytest.approx(0.5) and r["positive_only"]["math"] == pytest.approx(0.5)
    assert r["shift"]["reasoning"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="delta"):
        category_mass({"row": [0], "position": [0], "token_id": [65]}, CharTok())
