"""Evaluation: sample `n` answers per problem, verify them, report avg@k and pass@k.

    tokencredit eval --model smollm2-135m-instruct --data arithmetic --n 32 --k 32 --limit 64
    tokencredit eval --model runs/my-run --data aime24.jsonl aime25.jsonl --n 32 --k 32
    tokencredit eval --model runs/my-run/checkpoints/step_20 --data arithmetic --n 8
    tokencredit eval --suite paper --data-dir DIR --model runs/my-run   # the paper's table (tokencredit/suite.py)
    tokencredit eval --help

Metrics (METHODS.md section 7; Chen et al. 2021, "Evaluating Large Language
Models Trained on Code", eq. 1 for pass@k):

- `avg@k`: mean accuracy over the first k of the n samples of a problem,
  averaged over problems (k <= n);
- `pass@k`: the unbiased estimator 1 - C(n-c, k) / C(n, k) from all n samples
  with c correct, averaged over problems; `pass@1` = c / n.

`--model` takes what `load_model` takes (alias, model directory, .gguf file,
cached hub id) and also a run directory or one of its checkpoints
(`tokencredit.export.resolve_model`): a run directory means its final/
model, or, for a run stopped before its end, its latest checkpoint on the
run's base model (one line says so); RUN_DIR/checkpoints/step_N means those
weights on the run's base model.

Paper sampling defaults: temperature 0.6, top-p 0.95. A response is correct
when `MathVerifier` gives it reward >= 0.5 (it gives exactly 0 or 1); inside
training the trainer's own reward functions score it and `threshold` is
reward.correct_threshold (docs/rewards.md).

Outputs under `--out`: `<dataset>.jsonl` (one row per problem: id, answer, n, c,
avg@k, pass@k, lengths and the first few responses, truncated) and
`summary.json` (one summary per dataset); a rich table on stdout.

Deliberate simplifications: HF `generate` only (no vLLM yet); one process;
prompts are rendered with the tokenizer's chat template exactly as in
training (`render_prompt`), with no few-shot examples; no prompt is skipped
for length. Problems are sampled in length-sorted chunks (less left padding)
and reported in file order.

Try it (seconds, random weights):
    tokencredit eval --model tiny-random --data arithmetic --n 4 --k 2 --limit 8 --out /tmp/ev
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Sequence

from tokencredit.data.promptset import EVAL_SEED_OFFSET  # the trainer's held-out arithmetic problems: train.seed + this

DEFAULT_TEMPERATURE = 0.6  # paper sampling (METHODS.md section 7)
DEFAULT_TOP_P = 0.95
KEEP_RESPONSES = 4  # responses written per problem in the jsonl
RESPONSE_CHARS = 1000  # each kept response is cut to its last this many characters
CORRECT_AT = 0.5  # reward >= this counts as a correct sample


# ------------------------------------------------------------------ pure metrics
def _check_nck(n: int, c: int, k: int) -> None:
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    The ratio is computed as a product in log space, never as binomials
    (which overflow floats from n ~ 1030):

        C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)          (c factors)
                            = prod_{j=0}^{k-1}  (1 - c/(n-j))        (k factors)

    using whichever has fewer factors, summed with log1p and turned back with
    -expm1, so the result keeps full relative precision near 0 as well.
    Exact edge cases: c = 0 -> 0.0; n - c < k (every k-subset holds a correct
    sample) -> 1.0. Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    _check_nck(n, c, k)
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    if c <= k:
        log_ratio = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    else:
        log_ratio = math.fsum(math.log1p(-c / (n - j)) for j in range(k))
    return min(1.0, max(0.0, -math.expm1(log_ratio)))


def avg_at_k(rewards: Sequence[float], k: int) -> float:
    """avg@k of one problem: the mean of the first k sample rewards (k <= len).

    With 0/1 rewards this is the accuracy over k samples. Raises ValueError
    for k < 1 or k > len(rewards).
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if not 1 <= k <= len(rewards):
        raise ValueError(f"k must be in [1, {len(rewards)}] (the number of samples), got {k}")
    return math.fsum(float(r) for r in rewards[:k]) / k


def pass_curve_ks(k: int) -> list[int]:
    """The k values reported as a pass@k curve: powers of two below k, and k."""
    out, p = [], 1
    while p < k:
        out.append(p)
        p *= 2
    return out + [k]


# ------------------------------------------------------------------ evaluation
def evaluate(
    model,
    tokenizer,
    problems: Sequence[Any],
    *,
    n: int,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int = 512,
    gen_batch_size: int = 32,
    system_prompt: str | None = None,
    progress: bool = True,
    seed: int | None = None,
    verifier=None,
    name: str = "eval",
) -> tuple[list[dict], dict]:
    """Sample `n` responses for each Problem (prompt, answer, id), score them.

    Prompts are rendered with the tokenizer's chat template (`render_prompt`,
    optional `system_prompt`); see `evaluate_prompts` for the rest. Returns
    `(per_problem, summary)`.
    """
    from tokencredit.data import render_prompt

    prompts = [render_prompt(tokenizer, p.prompt, system_prompt) for p in problems]
    return evaluate_prompts(
        model, tokenizer, prompts, [p.answer for p in problems], ids=[p.id for p in problems],
        n=n, k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        gen_batch_size=gen_batch_size, progress=progress, seed=seed, verifier=verifier, name=name,
    )


def evaluate_prompts(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    n: int,
    k: int,
    ids: Sequence[str] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int = 512,
    gen_batch_size: int = 32,
    progress: bool = True,
    seed: int | None = None,
    verifier=None,
    name: str = "eval",
    questions: Sequence[str] | None = None,
    extras: Sequence[dict] | None = None,
    threshold: float = CORRECT_AT,
) -> tuple[list[dict], dict]:
    """Evaluate already rendered prompts (what the Trainer holds).

    Problems go to `generate_hf` in chunks of max(1, gen_batch_size // n)
    problems (n rows each), shortest prompts first, and are scored chunk by
    chunk with `verifier` (a `MathVerifier(timeout_s=1)` made and closed here
    when None) called as `verifier(responses, answers) -> rewards`; with
    `questions` (one per prompt, no chat markup) it is the trainer's
    `RewardFunctions`, called as `verifier(responses, answers, questions,
    extra columns)` (`extras`: one dict per prompt) and its rewards taken. A
    response is correct when its reward >= `threshold`.

    With `seed`, sampling runs under a forked torch RNG seeded
    with it, so the caller's RNG stream is untouched (and the result does not
    depend on what ran before); without, it draws from the global RNG.

    Returns `(per_problem, summary)`: per_problem in input order, one dict per
    problem with id, answer, n, c, correct (list of 0/1), avg@k, pass@k,
    pass@1, mean_len, finished_frac, responses (first KEEP_RESPONSES, tails
    of RESPONSE_CHARS); summary with the means over problems (avg@k, pass@k,
    pass@1, pass_curve {k': pass@k'}), response_len_mean, finished_frac,
    tokens, wall_s, gen_tokens_per_s and the sampling settings.
    """
    import torch
    from tqdm.auto import tqdm

    from tokencredit.rollout.hf import generate_hf

    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    ids = list(ids) if ids is not None else [f"{name}-{i}" for i in range(len(prompts))]
    if len(ids) != len(prompts):
        raise ValueError(f"got {len(ids)} ids for {len(prompts)} prompts")
    _check_nck(n, 0, k)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")

    own_verifier = verifier is None
    if own_verifier:
        from tokencredit.rewards import MathVerifier

        verifier = MathVerifier(timeout_s=1)
    lengths = [len(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))  # less left padding per chunk
    per_chunk = max(1, gen_batch_size // n)
    results: list[dict | None] = [None] * len(prompts)
    t_gen = t_score = 0.0
    tokens = 0
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            bar = tqdm(total=len(prompts), desc=name, unit="problem", disable=not progress, dynamic_ncols=True)
            for s in range(0, len(order), per_chunk):
                idx = order[s : s + per_chunk]
                t0 = time.perf_counter()
                batch = generate_hf(
                    model, tokenizer, [prompts[i] for i in idx], n=n, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, gen_batch_size=gen_batch_size, answers=[answers[i] for i in idx],
                )
                t1 = time.perf_counter()
                if questions is None:
                    rewards = verifier(batch.response_text, batch.answer)  # [len(idx) * n], groups adjacent
                else:
                    of_row = [i for i in idx for _ in range(n)]  # prompt of each response row
                    cols = sorted({c for i in idx for c in (extras[i] if extras else {})})
                    rewards = verifier(batch.response_text, batch.answer, [questions[i] for i in of_row],
                                       {c: [extras[i].get(c) for i in of_row] for c in cols})[0]
                t_score += time.perf_counter() - t1
                t_gen += t1 - t0
                lens = batch.response_lengths.tolist()
                tokens += int(sum(lens))
                for j, i in enumerate(idx):
                    rows = slice(j * n, (j + 1) * n)
                    results[i] = _problem_record(
                        ids[i], answers[i], rewards[rows], lens[rows], batch.finished[rows], batch.response_text[rows], k,
                        threshold,
                    )
                bar.update(len(idx))
                bar.set_postfix({f"avg@{k}": f"{_mean(r[f'avg@{k}'] for r in results if r):.3f}"})
            bar.close()
    finally:
        if own_verifier:
            verifier.close()
    per_problem = [r for r in results if r is not None]
    wall = time.perf_counter() - t_start
    summary = summarize(per_problem, k)
    summary.update({
        "name": name, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "seed": seed, "tokens": tokens, "wall_s": wall, "time_generate_s": t_gen, "time_score_s": t_score,
        "gen_tokens_per_s": tokens / max(t_gen, 1e-9),
    })
    return per_problem, summary


def _problem_record(pid, answer, rewards, lens, finished, texts, k, threshold: float = CORRECT_AT) -> dict:
    n = len(rewards)
    correct = [int(r >= threshold) for r in rewards]
    c = sum(correct)
    return {
        "id": pid,
        "answer": answer,
        "n": n,
        "c": c,
        "k": k,
        f"avg@{k}": avg_at_k(correct, k),
        f"pass@{k}": pass_at_k(n, c, k),
        "pass@1": c / n,
        "correct": correct,
        "mean_len": _mean(lens),
        "finished_frac": _mean(float(f) for f in finished),
        "responses": [t if len(t) <= RESPONSE_CHARS else "..." + t[-RESPONSE_CHARS:] for t in texts[:KEEP_RESPONSES]],
    }


def summarize(per_problem: Sequence[dict], k: int) -> dict:
    """Means over problems of avg@k, pass@k, pass@1 and the pass@k' curve
    (k' in `pass_curve_ks(k)`), from per-problem records with n, c, correct."""
    P = len(per_problem)
    if P == 0:
        nan = float("nan")
        return {"num_problems": 0, "n": None, "k": k, f"avg@{k}": nan, f"pass@{k}": nan, "pass@1": nan,
                "pass_curve": {}, "solved_any": 0, "response_len_mean": nan, "finished_frac": nan}
    ns = {r["n"] for r in per_problem}
    curve = {str(kk): _mean(pass_at_k(r["n"], r["c"], kk) for r in per_problem) for kk in pass_curve_ks(k)}
    return {
        "num_problems": P,
        "n": ns.pop() if len(ns) == 1 else sorted(ns),
        "k": k,
        f"avg@{k}": _mean(avg_at_k(r["correct"], k) for r in per_problem),
        f"pass@{k}": curve[str(k)],
        "pass@1": _mean(r["c"] / r["n"] for r in per_problem),
        "pass_curve": curve,
        "solved_any": sum(1 for r in per_problem if r["c"] > 0),
        "response_len_mean": _mean(r["mean_len"] for r in per_problem),
        "finished_frac": _mean(r["finished_frac"] for r in per_problem),
    }


def _mean(xs) -> float:
    xs = list(xs)
    return math.fsum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="sample n answers per problem and report avg@k / pass@k",
        description=(
            "Sample --n responses per problem (temperature 0.6, top-p 0.95 by default), score them with the "
            "math verifier and report avg@k and unbiased pass@k. --data takes 'arithmetic' (the built-in task; "
            "with the same --seed as train.seed these are the trainer's held-out problems) or .jsonl/.parquet "
            "files with prompt (or problem) and answer fields; several files are evaluated in one run. "
            "--suite paper --data-dir DIR runs the cancellation paper's six benchmarks and prints its Table-2 row."
        ),
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="alias, local model directory, .gguf file, cached hub id, run directory (its final/ model, else its latest checkpoint) or RUN_DIR/checkpoints/step_N (default: %(default)s)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE", help="'arithmetic' or .jsonl/.parquet files (default: arithmetic)")
    p.add_argument("--n", type=int, default=32, help="samples per problem (default: %(default)s)")
    p.add_argument("--k", type=int, default=None, help="k of avg@k and pass@k, <= n (default: n)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus threshold (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response length limit in tokens (default: 512; with --suite paper 8192, the paper's max_response_length)")
    p.add_argument("--gen-batch-size", type=int, default=32, help="rows generated at once (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each file; for arithmetic the number of problems (default: all / 100)")
    p.add_argument("--difficulty", type=int, default=1, help="arithmetic difficulty 1-7 (table in tokencredit/data/arithmetic.py; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; also picks the arithmetic problems (default: %(default)s)")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template (default: the template's own)")
    p.add_argument("--prompt-field", default=None, help="question column of data files (default: prompt, else problem)")
    p.add_argument("--answer-field", default="answer", help="answer column of data files (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: evals/eval-<timestamp>)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("benchmark suite (tokencredit/suite.py; docs/evaluation.md, \"The paper's table\")")
    g.add_argument("--suite", choices=["paper"], default=None, help="run a suite's benchmark files from --data-dir and print its table: 'paper' = the cancellation paper's Table 2 (AIME24, AIME25, AMC avg@--n; Olympiad, Minerva, MATH-500 pass@1)")
    g.add_argument("--data-dir", default=None, metavar="DIR", help="folder with the suite's files (paper: aime24.jsonl aime25.jsonl amc2023.jsonl olympiadbench.jsonl minervamath.jsonl math500.jsonl)")
    g.add_argument("--allow-missing", action="store_true", help="leave out the columns whose file is missing (default: a missing file is an error)")
    g.add_argument("--resume", action="store_true", help="continue the suite run in --out from its per-problem files (same settings required)")
    g.add_argument("--pass1-n", type=int, default=1, help="samples per problem of the pass@1 benchmarks; --n is the avg@k benchmarks' (default: %(default)s)")
    g.add_argument("--prompt-template", default="{problem}", help="user message around each problem; must contain {problem} (default: %(default)s: the files already end with the boxed-answer instruction)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the --prompt-template text as is, without the tokenizer's chat template")
    p.set_defaults(func=cmd_eval)


ARITHMETIC_DEFAULT_PROBLEMS = 100


def check_sampling_args(args) -> int:
    """--k, --temperature, --top-p, --max-new-tokens, --gen-batch-size, --limit (shared
    with `eval --suite`); returns the resolved k. Raises ConfigError with one line."""
    from tokencredit.config import ConfigError

    k = args.n if args.k is None else args.k
    if not 1 <= k <= args.n:
        raise ConfigError(f"--k must be between 1 and --n ({args.n}), got {k}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1 or args.gen_batch_size < 1:
        raise ConfigError("--max-new-tokens and --gen-batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    return k


def _check_args(args) -> int:
    """Validate before any model is loaded; returns the resolved k."""
    from tokencredit.config import ConfigError

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    k = check_sampling_args(args)
    if args.difficulty not in range(1, 8):
        raise ConfigError(f"--difficulty must be 1..7, got {args.difficulty}")
    return k


def _datasets(args) -> list[tuple[str, str, list]]:
    """[(name, source, problems)] for every --data entry; names are unique file stems."""
    from tokencredit.data import arithmetic_problems, load_problems

    out: list[tuple[str, str, list]] = []
    seen: set[str] = set()
    for d in args.data:
        if d == "arithmetic":
            name = f"arithmetic-d{args.difficulty}"
            probs = arithmetic_problems(args.limit or ARITHMETIC_DEFAULT_PROBLEMS, seed=args.seed + EVAL_SEED_OFFSET, difficulty=args.difficulty)
        else:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(d).stem) or "data"
            probs = load_problems(d, prompt_field=args.prompt_field, answer_field=args.answer_field, limit=args.limit)
        base, i = name, 2
        while name in seen:
            name, i = f"{base}-{i}", i + 1
        seen.add(name)
        out.append((name, d, probs))
    return out


def cmd_eval(args) -> int:
    from tokencredit.export import load_for_eval
    from tokencredit.rewards import MathVerifier

    if args.suite is not None:
        from tokencredit.suite import PAPER_MAX_NEW_TOKENS, run_suite

        if args.max_new_tokens is None:
            args.max_new_tokens = PAPER_MAX_NEW_TOKENS
        return run_suite(args)
    from tokencredit.config import ConfigError

    if args.data_dir is not None or args.resume or args.allow_missing:
        raise ConfigError("--data-dir, --resume and --allow-missing go with --suite")
    if args.data is None:
        args.data = ["arithmetic"]
    if args.max_new_tokens is None:
        args.max_new_tokens = 512
    k = _check_args(args)
    datasets = _datasets(args)  # data errors before the (slow) model load
    from tokencredit.model import resolve_device

    model, tok, src = load_for_eval(args.model, dtype=args.dtype, device=str(resolve_device(args.device)))
    if src.note:
        print(f"tokencredit: {src.note}", flush=True)
    out = Path(args.out) if args.out else Path("evals") / time.strftime("eval-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    with MathVerifier(timeout_s=1) as verifier:
        for name, source, problems in datasets:
            per, summary = evaluate(
                model, tok, problems, n=args.n, k=k, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, system_prompt=args.system_prompt,
                progress=not args.quiet, seed=args.seed, verifier=verifier, name=name,
            )
            path = out / f"{name}.jsonl"
            with open(path, "w") as f:
                for r in per:
                    f.write(json.dumps(r) + "\n")
            summary.update({"data": source, "per_problem_file": path.name})
            summaries.append(summary)
    meta = {"model": args.model, "model_loaded": src.describe, "n": args.n, "k": k, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "summary.json").write_text(json.dumps({**meta, "datasets": summaries}, indent=2) + "\n")
    from tokencredit.tracking import send_eval_summary

    send_eval_summary(args.model, summaries)  # --model RUN_DIR[/...]: the run's trackers (output.report_to) get them too
    _print_table(summaries, k, args, out)
    return 0


def _print_table(summaries: list[dict], k: int, args, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.model}: n={args.n}, T={args.temperature}, top-p={args.top_p}, max {args.max_new_tokens} tok")
    for col in ("dataset", "probs", f"avg@{k}", f"pass@{k}", "pass@1", "solved", "len", "tok/s"):
        t.add_column(col, justify="left" if col == "dataset" else "right", no_wrap=True)
    for s in summaries:
        t.add_row(
            s["name"], str(s["num_problems"]), f"{s[f'avg@{k}']:.3f}", f"{s[f'pass@{k}']:.3f}", f"{s['pass@1']:.3f}",
            f"{s['solved_any']}/{s['num_problems']}", f"{s['response_len_mean']:.1f}", f"{s['gen_tokens_per_s']:.0f}",
        )
    Console().print(t)
    Console().print(f"per-problem results and summary.json in {out}")

