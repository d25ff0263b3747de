"""avg@k / pass@k (pure, exact and brute-force checked) and `tokencredit eval` on the tiny model."""

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencredit.cli import main
from tokencredit.data import load_problems
from tokencredit.evaluate import avg_at_k, evaluate, pass_at_k, pass_curve_ks, summarize


def _exact(n, c, k) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# ------------------------------------------------------------------ pass@k
@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_brute_force_over_subsets(n):
    """pass@k = fraction of k-subsets of the n samples holding a correct one
    (samples 0..c-1 are the correct ones)."""
    for c in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hit = sum(1 for s in subsets if min(s) < c)
            # float64: a <= 7-term fsum of log1p, then expm1: error ~4 u ~ 1e-15; abs 1e-12 is slack
            assert pass_at_k(n, c, k) == pytest.approx(hit / len(subsets), abs=1e-12), (n, c, k)


@pytest.mark.parametrize(
    "n,c,k,want",
    [(4, 1, 2, 0.5), (4, 0, 2, 0.0), (4, 3, 2, 1.0), (4, 2, 2, 5 / 6), (5, 5, 1, 1.0), (10, 1, 1, 0.1), (32, 8, 1, 0.25)],
)
def test_pass_at_k_hand_values(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-15)  # float64, values <= 1: error <= ~4 u = 4.4e-16


def test_pass_at_k_edge_cases_are_exact():
    assert pass_at_k(7, 0, 3) == 0.0  # nothing correct
    assert pass_at_k(7, 5, 3) == 1.0  # n - c = 2 < k: every subset holds a correct sample
    assert pass_at_k(7, 7, 7) == 1.0


@pytest.mark.parametrize("n,c,k", [(1000, 3, 100), (1000, 900, 50), (1000, 1, 999), (5000, 10, 2500), (10**6, 1, 1), (10**6, 500, 1000)])
def test_pass_at_k_large_n_is_stable_and_exact(n, c, k):
    got = pass_at_k(n, c, k)
    assert math.isfinite(got) and 0.0 <= got <= 1.0
    want = float(_exact(n, c, k))
    # fsum of exact-sum log1p terms (each ~1 ulp; log1p(-k/i) near -1 amplifies to ~1e2 u) then -expm1, which keeps
    # relative precision: ~1e-14 at worst against the exact fraction; rel 1e-12 leaves 100x
    assert got == pytest.approx(want, rel=1e-12, abs=0), (got, want)


def test_pass_at_k_keeps_relative_precision_near_zero():
    # 1 - (1 - 1e-9) must not round to 0 or lose digits
    assert pass_at_k(10**9, 1, 1) == pytest.approx(1e-9, rel=1e-12)  # log1p / expm1: a few u relative; 1 - p would lose 9 digits


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_properties(nck):
    n, c, k = nck
    p = pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    # float64 (as test_pass_at_k_large_n): rel ~1e-14, abs for p ~ 0; rel 1e-9 is slack
    assert p == pytest.approx(float(_exact(n, c, k)), rel=1e-9, abs=1e-15)
    # monotone up to rounding: each p <= 1 carries <= ~4 u = 4.4e-16 abs, so a 1e-15 slack (the true step is >= 0)
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p - 1e-15  # more correct samples never hurt
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p - 1e-15  # more attempts never hurt
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-12, abs=1e-15)  # pass@1 = accuracy


# ------------------------------------------------------------------ avg@k
def test_avg_at_k_uses_the_first_k_samples():
    r = [1.0, 0.0, 1.0, 1.0]
    assert avg_at_k(r, 1) == 1.0
    assert avg_at_k(r, 2) == 0.5
    assert avg_at_k(r, 4) == 0.75
    for bad in (0, 5):
        with pytest.raises(ValueError):
            avg_at_k(r, bad)


def test_pass_curve_and_summarize():
    assert pass_curve_ks(1) == [1]
    assert pass_curve_ks(32) == [1, 2, 4, 8, 16, 32]
    assert pass_curve_ks(6) == [1, 2, 4, 6]
    recs = [
        {"n": 4, "c": 1, "correct": [0, 1, 0, 0], "mean_len": 3.0, "finished_frac": 1.0},
        {"n": 4, "c": 4, "correct": [1, 1, 1, 1], "mean_len": 5.0, "finished_frac": 0.5},
    ]
    s = summarize(recs, 2)
    assert s["num_problems"] == 2 and s["n"] == 4 and s["solved_any"] == 2
    # exact: float64 means of 0/1 scores (approx's default rel 1e-6 is slack)
    assert s["avg@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["pass@1"] == pytest.approx((0.25 + 1.0) / 2)
    assert s["pass_curve"] == {"1": s["pass@1"], "2": s["pass@2"]}


# ------------------------------------------------------------------ evaluate() on the tiny model
@pytest.fixture(scope="module")
def tiny():
    from tokencredit.model import load_model

    return load_model("tiny-random")


def test_evaluate_counts_are_consistent_and_seeded(tiny, digits_file):
    model, tok = tiny
    problems = load_problems(digits_file, limit=6)
    kw = dict(n=4, k=2, temperature=1.0, top_p=1.0, max_new_tokens=4, gen_batch_size=8, progress=False, seed=3)
    rng_before = torch.get_rng_state()
    per, summary = evaluate(model, tok, problems, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded runs leave the caller's RNG alone
    assert [r["id"] for r in per] == [p.id for p in problems]  # input order, despite length sorting
    for r, p in zip(per, problems):
        assert r["answer"] == p.answer and r["n"] == 4 and len(r["correct"]) == 4
        assert r["c"] == sum(r["correct"]) and 0 <= r["c"] <= 4
        assert r["avg@2"] == sum(r["correct"][:2]) / 2
        assert r["pass@2"] == pass_at_k(4, r["c"], 2)
        assert r["pass@1"] == r["c"] / 4
        assert 1 <= len(r["responses"]) <= 4 and 0 < r["mean_len"] <= 4
    assert summary["num_problems"] == 6 and summary["n"] == 4 and summary["k"] == 2
    # float64 means of the same per-problem numbers in another order: ~1e-16 apart; approx's default is slack
    assert summary["avg@2"] == pytest.approx(sum(r["avg@2"] for r in per) / 6)
    assert summary["pass@2"] == pytest.approx(sum(r["pass@2"] for r in per) / 6)
    assert summary["tokens"] == pytest.approx(sum(r["mean_len"] * 4 for r in per))
    per2, _ = evaluate(model, tok, problems, **kw)
    assert [r["correct"] for r in per2] == [r["correct"] for r in per]
    assert [r["responses"] for r in per2] == [r["responses"] for r in per]
    with pytest.raises(ValueError):
        evaluate(model, tok, problems, **{**kw, "k": 5})


# ------------------------------------------------------------------ CLI
def test_cli_eval_writes_outputs(digits_file, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", "--model", "tiny-random", "--data", str(digits_file), "--n", "2", "--k", "2", "--limit", "2",
               "--max-new-tokens", "4", "--out", str(out), "-q"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "digits.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["n"] == 2 and "pass@2" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-random" and summary["k"] == 2
    (ds,) = summary["datasets"]
    assert ds["num_problems"] == 2 and ds["data"] == str(digits_file) and ds["per_problem_file"] == "digits.jsonl"
    assert "pass@2" in capsys.readouterr().out


def test_cli_eval_arithmetic(tmp_path):
    out = tmp_path / "ar"
    rc = main(["eval", "--model", "tiny-random", "--data", "arithmetic", "--n", "2", "--limit", "2",
               "--max-new-tokens", "2", "--out", str(out), "-q"])
    assert rc == 0
    assert len((out / "arithmetic-d1.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "summary.json").read_text())["k"] == 2  # k defaults to n


@pytest.mark.parametrize(
    "args,msg",
    [(["--n", "2", "--k", "4"], "--k"), (["--n", "0"], "--n"), (["--top-p", "1.5"], "--top-p"), (["--data", "nope.jsonl"], "nope.jsonl")],
)
def test_cli_eval_user_errors_exit_2_with_one_line(args, msg, tmp_path, capsys):
    rc = main(["eval", "--model", "tiny-random", "--out", str(tmp_path / "x"), "-q", *args])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokencredit: error:") and msg in err
    assert not (tmp_path / "x").exists()  # nothing written before validation
