"""Math reward: answer extraction, math-verify scoring, time limits, threads."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencredit.rewards import MathVerifier, extract_answer, score

# ------------------------------------------------------------------ extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{47}.", "47"),
        ("\\boxed{\\frac{1}{2}} no wait \\boxed{ \\frac{3}{4} }", "\\frac{3}{4}"),  # last, stripped
        ("\\boxed{a{b{c}}d} end", "a{b{c}}d"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not structure
        ("\\boxed{\\sqrt{2}} then \\boxed{}", "\\sqrt{2}"),  # empty box skipped
        ("\\boxed 5.", "5"),  # without braces
        ("\\fbox{12}", "12"),
        ("The answer is 47.", "47"),  # no box: last number, trailing period dropped
        ("first -3, then 2/3", "2/3"),
        ("x-3", "3"),  # a minus after a letter is not a sign
        ("it is -12", "-12"),
        ("about 3.25 or .5", ".5"),
        ("1,000 apples", "1000"),
        ("(3,-2)", "-2"),
        ("half: \\frac{3}{4}", "\\frac{3}{4}"),
        ("7 \\boxed{unclosed", "7"),  # an unbalanced box is no box
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_linear_on_huge_input():
    t0 = time.monotonic()
    assert extract_answer("\\boxed{" * 30_000) is None
    assert extract_answer("\\boxed" * 30_000 + " 9") == "9"
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ score


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("\\boxed{47}", "47", 1.0),
        ("\\boxed{46}", "47", 0.0),
        ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
        ("\\boxed{\\frac{3}{4}}", "\\dfrac{3}{4}", 1.0),  # raw gold would parse to nothing
        ("\\boxed{0.75}", "\\frac34", 1.0),
        ("\\boxed{(3, -2)}", "(3, -2)", 1.0),
        ("\\boxed{-2}", "(3, -2)", 0.0),  # raw gold would misparse to -2 and say 1.0
        ("\\boxed{10\\sqrt{2}}", "10\\sqrt{2}", 1.0),
        ("\\boxed{10}", "10\\sqrt{2}", 0.0),  # raw gold would misparse to 10
        ("so the answer is 47.", "47", 1.0),
        ("so the answer is 47.", "48", 0.0),
        ("\\boxed{47} wait, no: \\boxed{48}", "48", 1.0),  # the last box counts
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{12}", 12, 1.0),  # numeric gold
        ("\\boxed{221, 8}", "$221,$8$", 1.0),  # stray `$` in an OlympiadBench gold
        ("no answer", "47", 0.0),
        ("\\boxed{47}", "", 0.0),
    ],
)
def test_score_hand_checked(response, gold, expected):
    assert score(response, gold) == expected


def test_score_half_second_timeout_is_rounded_up():
    # math-verify with parsing_timeout=0.5 parses everything to [] (METHODS.md 8)
    assert score("\\boxed{47}", "47", timeout_s=0.5) == 1.0


def test_score_never_raises_on_wrong_types():
    assert score(None, "1") == 0.0  # type: ignore[arg-type]
    assert score("\\boxed{1}", None) == 0.0  # type: ignore[arg-type]
    assert score("\\boxed{1}", "1", timeout_s="x") == 0.0  # type: ignore[arg-type]


def test_math_verify_logger_quiet():
    assert logging.getLogger("math_verify").level == logging.ERROR


ADVERSARIAL = {
    "nested_5000": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "nested_in_tail": "\\boxed{" + "{" * 190 + "1" + "}" * 190 + "}",  # reaches math-verify
    "boxed_20k": "\\boxed{}" * 20_000,
    "power_tower": "\\boxed{9^{9^{9^9}}}",
    "one_megabyte": "x" * 1_000_000 + " 1",
    "empty": "",
    "surrogates": "\ud800 \\boxed{\udfff} \udc00",
}
LIMIT_S = 6.0  # per item; math-verify's own limits make it ~1-3 s at timeout_s=1


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_main_thread(name):
    t0 = time.monotonic()
    assert score(ADVERSARIAL[name], "47") == 0.0
    assert time.monotonic() - t0 < LIMIT_S


def _run_in_thread(fn):
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # surfaced in the main thread below
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "scoring thread hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture(scope="module")
def threaded():
    """A default verifier (workers=0) driven from threads: it scores in one worker
    process, shared by the tests below (each process start costs ~1 s)."""
    with MathVerifier(timeout_s=1) as v:
        assert _run_in_thread(lambda: v(["\\boxed{1}"], ["1"])) == [1.0]  # start-up off the clock
        yield v


def _delta(v: MathVerifier, before: dict, key: str) -> int:
    return v.stats[key] - before[key]


def test_verifier_from_thread_adversarial_and_normal(threaded):
    names = sorted(ADVERSARIAL)
    responses = [ADVERSARIAL[n] for n in names] + ["\\boxed{47}", "\\boxed{\\frac{3}{4}}"]
    golds = ["47"] * len(names) + ["47", "0.75"]
    before = dict(threaded.stats)
    t0 = time.monotonic()
    rewards = _run_in_thread(lambda: threaded(responses, golds))
    assert rewards == [0.0] * len(names) + [1.0, 1.0]
    assert time.monotonic() - t0 < LIMIT_S * len(names)
    assert _delta(threaded, before, "items") == len(responses)
    assert _delta(threaded, before, "worker_starts") == 0
    assert threaded.stats["worker_starts"] == 1


def test_score_from_thread():
    assert _run_in_thread(lambda: [score("\\boxed{47}", "47"), score("\\boxed{46}", "47")]) == [1.0, 0.0]


def test_verifier_main_thread_inline_and_cache():
    with MathVerifier() as v:
        assert v(["\\boxed{47}", "47.", "\\boxed{46}", ""], ["47"] * 4) == [1.0, 1.0, 0.0, 0.0]
        assert v(["\\boxed{47}"], ["47"]) == [1.0]
        assert v.stats["cache_hits"] == 1  # the repeat ("47." was deduplicated within the batch)
        assert v.stats["no_answer"] == 1
        assert v.stats["worker_starts"] == 0  # main thread, workers=0: no processes


def test_verifier_kills_and_replaces_hung_worker(threaded):
    # the power tower keeps math-verify busy ~1 s: far past a 0.2 s hard limit
    before, limit = dict(threaded.stats), threaded.item_limit_s
    threaded.item_limit_s = 0.2
    try:
        assert _run_in_thread(lambda: threaded(["\\boxed{9^{9^{9^9}}}"], ["48"])) == [0.0]
    finally:
        threaded.item_limit_s = limit
    assert _run_in_thread(lambda: threaded(["\\boxed{5}"], ["5"])) == [1.0]
    assert _delta(threaded, before, "timeouts") == 1
    assert _delta(threaded, before, "worker_starts") == 1


def test_verifier_survives_dead_worker(threaded):
    before = dict(threaded.stats)
    threaded._pool[0].proc.kill()
    threaded._pool[0].proc.wait()
    assert _run_in_thread(lambda: threaded(["\\boxed{3}"], ["3"])) == [1.0]
    assert _delta(threaded, before, "crashes") == 1
    assert _delta(threaded, before, "worker_starts") == 1


def test_verifier_with_two_workers_keeps_order():
    responses = [f"step {i}: \\boxed{{{i * 7}}}" for i in range(12)]
    golds = [str(i * 7 if i % 3 else i * 7 + 1) for i in range(12)]
    with MathVerifier(workers=2) as v:
        assert v(responses, golds) == [0.0 if i % 3 == 0 else 1.0 for i in range(12)]


def test_verifier_rejects_bad_arguments():
    with pytest.raises(ValueError, match="whole number"):
        MathVerifier(timeout_s=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MathVerifier(workers=-1)
    with MathVerifier() as v, pytest.raises(ValueError, match="2 responses but 1 golds"):
        v(["a", "b"], ["1"])


# ------------------------------------------------------------------ properties

_FRAGMENTS = ["\\boxed{", "{", "}", "\\frac", "\\sqrt", "9", "-", ".", "/", "$", " ", "\\", "x", "(", ",", ")"]


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=()), max_size=200), st.text(max_size=20))
def test_score_never_raises_on_arbitrary_text(response, gold):
    assert score(response, gold) in (0.0, 1.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join))
def test_score_never_raises_on_latex_soup(response):
    assert score(response, "(3, -2)") in (0.0, 1.0)
    extracted = extract_answer(response)
    assert extracted is None or isinstance(extracted, str)
