"""`tokencredit eval --suite paper`: the paper's table, per-sample seeded sampling, resume, missing files."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import tokencredit.suite as suite
from tokencredit.cli import main
from tokencredit.suite import SUITES, SeededSampler, sample_seed, table_row, top_p_filter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
COLUMNS = ["AIME24", "AIME25", "AMC", "Olympiad", "Minerva", "MATH-500"]


# ------------------------------------------------------------------ pure parts
def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    out = top_p_filter(logits, 0.7)
    # row 0, descending 0.5, 0.3 | 0.15, 0.05: mass before 0.15 is 0.8 >= 0.7 -> dropped
    assert torch.isinf(out[0]).tolist() == [True, False, True, False]
    # row 1: mass before the 3rd token is 0.5 < 0.7, before the 4th 0.75 >= 0.7
    assert int(torch.isinf(out[1]).sum()) == 1
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.isinf(top_p_filter(logits, 1e-6)).sum(dim=1).tolist() == [3, 3]  # the top token always stays


def test_seeded_sampler_draws_from_the_nucleus_distribution():
    """Gumbel-max after temperature and top-p = a draw from the renormalised nucleus."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = torch.log(p).expand(4000, 4).clone()  # (B, V), one row per seed
    s = SeededSampler(range(4000), temperature=1.0, top_p=0.7, device="cpu")
    picks = s(None, scores).argmax(dim=-1)
    freq = torch.bincount(picks, minlength=4).double() / 4000
    assert freq[2] == 0 and freq[3] == 0  # outside the nucleus
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.03)  # statistical: sd sqrt(.625 * .375 / 4000) = 0.0077, 0.03 = 3.9 sd (fixed seeds)
    s = SeededSampler(range(4000, 8000), temperature=0.5, top_p=1.0, device="cpu")
    freq = torch.bincount(s(None, scores).argmax(dim=-1), minlength=4).double() / 4000
    want = p**2 / (p**2).sum()  # T = 0.5 squares the probabilities
    assert torch.allclose(freq, want.double(), atol=0.03), (freq, want)  # statistical: largest sd 0.0073, 0.03 = 4.1 sd


def test_seeded_sampler_rows_do_not_depend_on_their_neighbours():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = SeededSampler([7], 1.0, 0.95, "cpu")
    shared = SeededSampler([3, 7, 9], 1.0, 0.95, "cpu")
    for _ in range(3):  # successive decoding steps
        a = alone(None, scores[1:2])
        b = shared(None, scores)
        assert torch.equal(a[0], b[1])
    with pytest.raises(ValueError):
        SeededSampler([1], 0.0, 1.0, "cpu")


def test_sample_seed_depends_on_every_part():
    base = sample_seed(0, "aime24", 3, 1)
    assert base == sample_seed(0, "aime24", 3, 1) and 0 <= base < 2**63
    others = {sample_seed(1, "aime24", 3, 1), sample_seed(0, "aime25", 3, 1), sample_seed(0, "aime24", 4, 1),
              sample_seed(0, "aime24", 3, 2)}
    assert base not in others and len(others) == 4


def test_table_row_avg_is_the_mean_of_the_columns_as_in_paper_table_2():
    # Qwen3-4B-Base baseline row of the paper's Table 2: Avg 49.1
    row = table_row({"AIME24": 0.283, "AIME25": 0.242, "AMC": 0.580, "Olympiad": 0.532, "Minerva": 0.445, "MATH-500": 0.862})
    assert list(row) == COLUMNS + ["Avg"]
    assert row["Avg"] == pytest.approx(294.4 / 6) and round(row["Avg"], 1) == 49.1  # float64 mean of 6: error ~1e-15
    assert [b.column for b in SUITES["paper"]] == COLUMNS


# ------------------------------------------------------------------ the command on the tiny model
def _run(out, data_dir, *extra):
    return main(["eval", "--suite", "paper", "--data-dir", str(data_dir), "--model", "tiny-random",
                 "--out", str(out), "-q", *extra])


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared benchmark folder {SHARED} is absent")
def test_suite_on_the_shared_benchmarks(tmp_path, capsys, one_thread):
    out = tmp_path / "paper"
    assert _run(out, SHARED, "--limit", "2", "--n", "2", "--max-new-tokens", "4") == 0
    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == COLUMNS + ["Avg"] and table["left_out"] == []
    vals = [table["percent"][c] for c in COLUMNS]
    assert table["percent"]["Avg"] == pytest.approx(sum(vals) / 6)  # float64 mean of the same 6 numbers: ~1e-15 apart
    assert table["metrics"] == {"AIME24": "avg@2", "AIME25": "avg@2", "AMC": "avg@2",
                                "Olympiad": "pass@1", "Minerva": "pass@1", "MATH-500": "pass@1"}
    for b in SUITES["paper"]:
        rows = [json.loads(x) for x in (out / f"{b.key}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1]
        assert all(r["n"] == (2 if b.metric == "avg" else 1) for r in rows)  # --pass1-n defaults to 1
    settings = json.loads((out / "suite.json").read_text())
    assert (settings["temperature"], settings["top_p"], settings["max_new_tokens"]) == (0.6, 0.95, 4)
    md = (out / "table.md").read_text().splitlines()
    assert len(md) == 3 and md[2].count("|") == 9  # model + 6 columns + Avg
    assert "MATH-500" in capsys.readouterr().out


def test_suite_default_max_new_tokens_is_the_papers(tmp_path, monkeypatch):
    seen = {}

    def fake(model, tok, prompts, seeds, *, temperature, top_p, max_new_tokens):
        seen.update(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        rows = sum(len(s) for s in seeds)
        return ["x"] * rows, [1] * rows, [True] * rows

    monkeypatch.setattr(suite, "sample_chunk", fake)
    data = _hand_dir(tmp_path)
    assert _run(tmp_path / "o", data, "--n", "4") == 0
    assert seen == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8192}


# Known correctness per sample: pattern[j] == "1" -> sample j answers right.
HAND = {
    "aime24.jsonl": ["1100", "0001"],
    "aime25.jsonl": ["0000", "1111", "0110"],
    "amc2023.jsonl": ["0111"],
    "olympiadbench.jsonl": ["100", "111"],
    "minervamath.jsonl": ["000", "010"],
    "math500.jsonl": ["110", "001", "000", "111"],
}
# by hand, avg@2 = mean over problems of (first two samples right) / 2; pass@1 = mean of c / 3
HAND_PERCENT = {
    "AIME24": 100 * (1.0 + 0.0) / 2,
    "AIME25": 100 * (0.0 + 1.0 + 0.5) / 3,
    "AMC": 100 * 0.5,
    "Olympiad": 100 * (1 / 3 + 1) / 2,
    "Minerva": 100 * (0 + 1 / 3) / 2,
    "MATH-500": 100 * (2 / 3 + 1 / 3 + 0 + 1) / 4,
}


def _hand_dir(tmp_path, skip=()):
    d = tmp_path / "bench"
    d.mkdir(exist_ok=True)
    for name, patterns in HAND.items():
        if name in skip:
            continue
        rows = [{"problem": f"answer={10 + i} pattern={pat} Please reason step by step.", "answer": str(10 + i)}
                for i, pat in enumerate(patterns)]
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _scripted(model, tok, prompts, seeds, *, temperature, top_p, max_new_tokens):
    """Responses built from each prompt's answer and pattern, scored by the real verifier."""
    texts = []
    for p, group in zip(prompts, seeds):
        answer, pattern = re.search(r"answer=(\d+) pattern=([01]+)", p).groups()
        assert len(pattern) == len(group)
        texts += [f"So the result is \\boxed{{{answer if bit == '1' else 999}}}." for bit in pattern]
    return texts, [5] * len(texts), [True] * len(texts)


def test_suite_columns_match_a_hand_computation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "sample_chunk", _scripted)
    out = tmp_path / "o"
    assert _run(out, _hand_dir(tmp_path), "--n", "4", "--k", "2", "--pass1-n", "3", "--gen-batch-size", "4") == 0
    table = json.loads((out / "table.json").read_text())
    # float64 averages of 0/1 hand scores (x 100): error ~1e-14, so abs 1e-9 and approx's default are slack
    for c, want in HAND_PERCENT.items():
        assert table["percent"][c] == pytest.approx(want, abs=1e-9), c
    assert table["percent"]["Avg"] == pytest.approx(sum(HAND_PERCENT.values()) / 6)
    assert table["metrics"]["AIME24"] == "avg@2" and table["metrics"]["MATH-500"] == "pass@1"
    md = (out / "table.md").read_text()
    assert f"| {HAND_PERCENT['AIME25']:.1f} |" in md and f"{sum(HAND_PERCENT.values()) / 6:.1f} |" in md
    rows = [json.loads(x) for x in (out / "math500.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1]]
    assert "AIME24" in capsys.readouterr().out


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_template_and_chat_template(chat, tmp_path, monkeypatch):
    seen = []

    def fake(model, tok, prompts, seeds, **kw):
        seen.extend(prompts)
        return _scripted(model, tok, prompts, seeds, **kw)

    monkeypatch.setattr(suite, "sample_chunk", fake)
    extra = [] if chat else ["--no-chat-template"]
    assert _run(tmp_path / "o", _hand_dir(tmp_path), "--n", "4", "--pass1-n", "3", "--prompt-template",
                "Q: {problem}\nA:", *extra) == 0
    raw = "Q: answer=10 pattern=1100 Please reason step by step.\nA:"  # aime24, problem 0
    assert len(seen) == sum(len(v) for v in HAND.values())
    if chat:
        assert raw not in seen and any(raw in p and p != raw for p in seen)  # wrapped in the chat markup
    else:
        assert raw in seen


def test_missing_file_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    data = _hand_dir(tmp_path, skip=("minervamath.jsonl",))
    out = tmp_path / "o"
    assert _run(out, data, "--n", "4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokencredit: error:") and "minervamath.jsonl" in err
    assert not out.exists()  # checked before anything is written or loaded
    monkeypatch.setattr(suite, "sample_chunk", _scripted)
    assert _run(out, data, "--n", "4", "--k", "2", "--pass1-n", "3", "--allow-missing") == 0
    assert "minervamath.jsonl is missing" in capsys.readouterr().out
    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == ["AIME24", "AIME25", "AMC", "Olympiad", "MATH-500", "Avg"] and table["left_out"] == ["Minerva"]
    five = [v for c, v in HAND_PERCENT.items() if c != "Minerva"]
    assert table["percent"]["Avg"] == pytest.approx(sum(five) / 5)  # float64 mean of five: error ~1e-14


@pytest.mark.parametrize(
    "args,msg",
    [([], "--data-dir"), (["--data-dir", "nowhere"], "nowhere"), (["--data-dir", "D", "--data", "x.jsonl"], "--data"),
     (["--data-dir", "D", "--prompt-template", "Q:"], "{problem}"), (["--data-dir", "D", "--n", "2", "--k", "3"], "--k"),
     (["--data-dir", "D", "--no-chat-template", "--system-prompt", "S"], "--system-prompt"), (["--data-dir", "D", "--out", "D"], "overwrite")],
)
def test_suite_user_errors(args, msg, tmp_path, capsys):
    d = str(_hand_dir(tmp_path))
    rc = main(["eval", "--suite", "paper", "--model", "tiny-random", "--out", str(tmp_path / "o"), "-q",
               *[d if a == "D" else a for a in args]])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err
    assert not (tmp_path / "o").exists()


def _files(out):
    return {p.name: p.read_text() for p in sorted(out.glob("*.jsonl"))}


def test_interrupted_suite_resumes_to_the_same_results(tmp_path, monkeypatch, capsys, one_thread):
    data = _hand_dir(tmp_path)
    args = ("--n", "2", "--pass1-n", "2", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "6",
            "--gen-batch-size", "4", "--seed", "5")
    full = tmp_path / "full"
    assert _run(full, data, *args) == 0
    want = _files(full)
    # real sampling: responses vary between samples and with the seed, so equality below means something
    texts = [t for line in want["math500.jsonl"].splitlines() for t in json.loads(line)["responses"]]
    assert len(set(texts)) > 1
    other = tmp_path / "other"
    assert _run(other, data, *args[:-1], "6") == 0
    assert _files(other) != want

    # interrupted: math500 (2 problems per chunk) stopped after 1 problem and a torn line, aime25 after 2,
    # minerva never started, no table written
    part = tmp_path / "part"
    assert _run(part, data, *args) == 0
    for f in ("table.json", "table.md", "summary.json", "minerva.jsonl"):
        (part / f).unlink()
    lines = want["math500.jsonl"].splitlines(keepends=True)
    (part / "math500.jsonl").write_text(lines[2] + lines[0][:30])  # completion order differs from file order
    (part / "aime25.jsonl").write_text("".join(want["aime25.jsonl"].splitlines(keepends=True)[:2]))
    assert _run(part, data, *args) == 2  # an existing run needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _run(part, data, *args[:-1], "6", "--resume") == 2  # with other settings it refuses
    assert "seed=5" in capsys.readouterr().err

    sampled = []
    real = suite.sample_chunk

    def counting(model, tok, prompts, seeds, **kw):
        sampled.append(len(prompts))
        return real(model, tok, prompts, seeds, **kw)

    monkeypatch.setattr(suite, "sample_chunk", counting)
    assert _run(part, data, *args, "--resume") == 0
    assert _files(part) == want
    assert sum(sampled) < sum(len(p) for p in HAND.values())  # finished problems were not sampled again
    assert json.loads((part / "table.json").read_text())["percent"] == json.loads((full / "table.json").read_text())["percent"]


def test_sample_chunk_rows_are_independent_of_the_batch(one_thread):
    from tokencredit.data import render_prompt
    from tokencredit.model import load_model

    model, tok = load_model("tiny-random")
    a, b = render_prompt(tok, "What is 2+2?"), render_prompt(tok, "A much longer question about 17 and 4?")
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=8)
    alone = suite.sample_chunk(model, tok, [a], [[11, 12]], **kw)
    together = suite.sample_chunk(model, tok, [b, a], [[13], [11, 12]], **kw)
    assert together[0][1:] == alone[0] and together[1][1:] == alone[1]
    assert alone[0][0] != alone[0][1]  # two seeds, two different samples
    assert suite.sample_chunk(model, tok, [a], [[11, 12]], **kw) == alone
    assert not math.isnan(sum(alone[1]))
