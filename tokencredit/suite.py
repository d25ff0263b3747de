"""`tokencredit eval --suite paper`: the cancellation paper's evaluation table in one command.

    tokencredit eval --suite paper --data-dir ../shared/data/benchmarks --model runs/my-run
    tokencredit eval --suite paper --data-dir DIR --model M --out evals/m --resume   # continue after a kill

Six benchmark files, one Table-2-style row (cancellation paper, Table 2 and
Appendix B "Evaluation"): AIME24, AIME25, AMC report avg@32; OlympiadBench,
Minerva, MATH-500 report pass@1; Avg is the unweighted mean of the six
columns; temperature 0.6, top-p 0.95; responses up to 8192 tokens (the
paper's max_response_length, Appendix B / Table 3). The paper does not state
its prompt template nor how many samples its pass@1 uses: ours are the
model's chat template around the problem text (the files already end with
the boxed-answer instruction) and one sample (`--pass1-n`). Defaults and
their sources: docs/evaluation.md, "The paper's table".

Sampling is keyed per sample, not per batch: sample j of problem i of
benchmark b draws its randomness from a generator seeded with
`sample_seed(seed, b, i, j)`. Rows are sampled with Gumbel-max, argmax(logits
/ T + G) with G ~ Gumbel(0, 1) i.i.d. per vocabulary entry, which is an exact
draw from softmax(logits / T) restricted to the top-p nucleus (`SeededSampler`).
So a sample does not depend on which other rows share its batch, and an
interrupted evaluation resumed from its per-problem JSONL equals an
uninterrupted one. Chunks are also fixed (length-sorted order of the whole
file, `gen_batch_size // n` problems each); a chunk with any missing problem
is generated again whole, so a resumed run repeats even the float rounding
of the uninterrupted one.

Deliberate simplifications: HF `generate` only; one process; no prompt is
skipped or cut for length (the paper's max_prompt_length 1024 is a training
setting); the Gumbel noise is drawn for every vocabulary entry at every step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from transformers import LogitsProcessor

from tokencredit.evaluate import _problem_record, avg_at_k, summarize
from tokencredit.model.precision import compute_autocast

PAPER_MAX_NEW_TOKENS = 8192  # paper, Appendix B and Table 3: max_response_length 8192
PAPER_AVG_N = 32  # paper, Appendix B: avg@32 on AIME24, AIME25, AMC
DEFAULT_PASS1_N = 1  # ours: the paper reports pass@1 without saying from how many samples
DEFAULT_PROMPT_TEMPLATE = "{problem}"  # ours: the files already carry the instruction


@dataclass(frozen=True)
class Benchmark:
    key: str  # dataset name in seeds and output file names
    column: str  # table header, as in the paper's Table 2
    file: str  # file name inside --data-dir
    metric: str  # "avg" (avg@k from n samples) or "pass1" (pass@1 = c / n)


# Column order of the paper's Table 2.
SUITES: dict[str, tuple[Benchmark, ...]] = {
    "paper": (
        Benchmark("aime24", "AIME24", "aime24.jsonl", "avg"),
        Benchmark("aime25", "AIME25", "aime25.jsonl", "avg"),
        Benchmark("amc", "AMC", "amc2023.jsonl", "avg"),
        Benchmark("olympiad", "Olympiad", "olympiadbench.jsonl", "pass1"),
        Benchmark("minerva", "Minerva", "minervamath.jsonl", "pass1"),
        Benchmark("math500", "MATH-500", "math500.jsonl", "pass1"),
    ),
}

# Settings that must match for --resume to continue an earlier run.
RESUME_KEYS = ("suite", "model", "n", "k", "pass1_n", "temperature", "top_p", "max_new_tokens", "seed",
               "prompt_template", "chat_template", "system_prompt", "limit", "prompt_field", "answer_field")


# ------------------------------------------------------------------ seeded sampling (pure)
def sample_seed(seed: int, dataset: str, index: int, sample: int) -> int:
    """The 63-bit seed of sample `sample` of problem `index` (its 0-based line
    in the file) of `dataset`: the first 8 bytes of sha256 of the four values."""
    h = hashlib.sha256(f"{seed}\x1f{dataset}\x1f{index}\x1f{sample}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def top_p_filter(logits, top_p: float):
    """Keep the nucleus: the fewest highest-probability tokens whose softmax mass
    reaches `top_p` (always at least the top token); the rest become -inf.

    logits: (B, V) -> (B, V). A token is dropped when the mass of the tokens
    strictly before it in descending order is already >= top_p.
    """
    import torch

    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) exclusive cumulative mass
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


class SeededSampler(LogitsProcessor):
    """Turns greedy decoding into sampling with one RNG per row.

    scores (B, V) -> logits / T, top-p filtered, plus Gumbel noise drawn from
    row b's own `torch.Generator` (seeded with seeds[b]); `generate`'s argmax
    of that is a draw from the nucleus distribution (Gumbel-max trick). Row b
    consumes exactly one (V,) draw per decoding step, whatever the other rows do.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device):
        import torch

        if temperature <= 0:
            raise ValueError("SeededSampler needs temperature > 0 (temperature 0 is plain greedy decoding)")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} seeds")
        x = top_p_filter(scores / self.temperature, self.top_p)  # (B, V)
        V = x.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=x.device, dtype=torch.float32) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))  # (B, V) ~ Gumbel(0, 1)
        return x + gumbel.to(x.dtype)


def sample_chunk(model, tokenizer, prompts: Sequence[str], seeds: Sequence[Sequence[int]], *, temperature: float,
                 top_p: float, max_new_tokens: int) -> tuple[list[str], list[int], list[bool]]:
    """Sample len(seeds[i]) responses for rendered prompt i, sample j seeded with seeds[i][j].

    Returns per response row (prompt-major, groups adjacent): text (cut at
    the first EOS, special tokens dropped), length in tokens including the
    EOS, finished (an EOS was produced).
    """
    import torch
    from transformers import LogitsProcessorList

    from tokencredit.rollout.hf import eos_token_ids, _shared_prompt_cache, response_mask_from_ids

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(tokenizer, model)
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    reps = torch.tensor([len(s) for s in seeds])
    ids = enc["input_ids"].repeat_interleave(reps, dim=0).to(device)  # (R, P), R = sum of samples
    am = enc["attention_mask"].repeat_interleave(reps, dim=0).to(device)
    row_seeds = [s for group in seeds for s in group]
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids, do_sample=False,
              temperature=None, top_p=None, top_k=None)
    if temperature > 0:
        kw["logits_processor"] = LogitsProcessorList([SeededSampler(row_seeds, temperature, top_p, device)])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), compute_autocast(model):  # the model's compute dtype (model/precision.py)
            cache = _shared_prompt_cache(model, ids, am)
            if cache is not None:
                kw["past_key_values"] = cache
            out = model.generate(input_ids=ids, attention_mask=am, **kw)
    finally:
        model.train(was_training)
    resp = out[:, ids.shape[1]:].cpu()  # (R, T)
    if resp.shape[1] == 0:
        resp = torch.full((len(row_seeds), 1), pad_id, dtype=torch.long)
    mask, finished = response_mask_from_ids(resp, eos_ids)  # (R, T), (R,)
    texts = tokenizer.batch_decode([r[m.bool()] for r, m in zip(resp, mask)], skip_special_tokens=True)
    return texts, [int(x) for x in mask.sum(dim=1).tolist()], [bool(f) for f in finished.tolist()]


# ------------------------------------------------------------------ per-problem JSONL (append, resume)
def read_rows(path: Path) -> dict[int, dict]:
    """Finished problems of an earlier run, by file index. A torn last line (a
    kill during the write) is dropped and the file rewritten without it."""
    if not path.is_file():
        return {}
    rows: dict[int, dict] = {}
    good: list[str] = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            from tokencredit.config import ConfigError

            raise ConfigError(f"{path}:{i + 1}: not valid JSON; delete the file to evaluate that benchmark again") from None
        rows[int(r["index"])] = r
        good.append(line)
    if len(good) != sum(1 for x in lines if x.strip()):
        path.write_text("".join(x + "\n" for x in good))
    return rows


def _write_sorted(path: Path, rows: dict[int, dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(rows[i]) + "\n" for i in sorted(rows)))
    os.replace(tmp, path)


# ------------------------------------------------------------------ table
def metric_name(b: Benchmark, k: int) -> str:
    return f"avg@{k}" if b.metric == "avg" else "pass@1"


def column_value(b: Benchmark, rows: Sequence[dict], k: int) -> float:
    """The benchmark's number (a fraction): mean over problems of avg@k (first k
    samples) for "avg" benchmarks, of c / n for "pass1" ones."""
    if not rows:
        return float("nan")
    if b.metric == "avg":
        return math.fsum(avg_at_k(r["correct"], k) for r in rows) / len(rows)
    return math.fsum(r["c"] / r["n"] for r in rows) / len(rows)


def table_row(values: dict[str, float]) -> dict[str, float]:
    """{column: percent} plus "Avg", the unweighted mean of the columns given
    (paper, Table 2)."""
    pct = {c: 100.0 * v for c, v in values.items()}
    pct["Avg"] = math.fsum(pct.values()) / len(pct) if pct else float("nan")
    return pct


def markdown_table(row: dict[str, float], metrics: dict[str, str], label: str) -> str:
    cols = list(row)
    head = "| model | " + " | ".join(f"{c} ({metrics[c]})" if c in metrics else c for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    body = f"| {label} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " |"
    return "\n".join([head, sep, body]) + "\n"


# ------------------------------------------------------------------ the command
def _settings(args, k: int) -> dict:
    return {
        "suite": args.suite, "model": args.model, "data_dir": str(args.data_dir), "n": args.n, "k": k,
        "pass1_n": args.pass1_n, "temperature": args.temperature, "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens, "seed": args.seed, "prompt_template": args.prompt_template,
        "chat_template": not args.no_chat_template, "system_prompt": args.system_prompt, "limit": args.limit,
        "prompt_field": args.prompt_field, "answer_field": args.answer_field, "gen_batch_size": args.gen_batch_size,
    }


def _check(args) -> tuple[int, list[tuple[Benchmark, Path, list]], Path, dict | None]:
    """Everything a user can get wrong, before the model loads: (k, [(benchmark,
    file, problems)], out dir, the earlier run's settings when resuming)."""
    from tokencredit.config import ConfigError
    from tokencredit.data import load_problems

    if args.suite not in SUITES:
        raise ConfigError(f"--suite must be one of {', '.join(SUITES)}, got {args.suite!r}")
    if args.data_dir is None:
        raise ConfigError("--suite needs --data-dir DIR (the folder with the benchmark files)")
    if args.data is not None:
        raise ConfigError("--suite takes its files from --data-dir; drop --data")
    if args.n < 1 or args.pass1_n < 1:
        raise ConfigError(f"--n and --pass1-n must be >= 1, got {args.n} and {args.pass1_n}")
    from tokencredit.evaluate import check_sampling_args

    k = check_sampling_args(args)
    if "{problem}" not in args.prompt_template:
        raise ConfigError(f"--prompt-template must contain {{problem}}, got {args.prompt_template!r}")
    if args.no_chat_template and args.system_prompt is not None:
        raise ConfigError("--system-prompt needs the chat template; drop --no-chat-template or --system-prompt")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir}: not a directory")
    found, missing = [], []
    for b in SUITES[args.suite]:
        path = data_dir / b.file
        (found if path.is_file() else missing).append((b, path))
    if missing and not args.allow_missing:
        names = ", ".join(p.name for _, p in missing)
        raise ConfigError(f"--data-dir {data_dir}: missing {names} (pass --allow-missing to leave those columns out)")
    if not found:
        raise ConfigError(f"--data-dir {data_dir}: none of the {args.suite} suite's files is there")
    for b, p in missing:
        print(f"tokencredit: {p} is missing; the {b.column} column is left out (--allow-missing)", flush=True)
    datasets = [(b, p, load_problems(p, prompt_field=args.prompt_field, answer_field=args.answer_field, limit=args.limit))
                for b, p in found]
    out = Path(args.out) if args.out else Path("evals") / time.strftime("suite-%Y%m%d-%H%M%S")
    if out.resolve() == data_dir.resolve():
        raise ConfigError("--out must not be --data-dir (the per-problem files would overwrite the benchmarks)")
    earlier = None
    if (out / "suite.json").is_file():
        earlier = json.loads((out / "suite.json").read_text())
        if not args.resume:
            raise ConfigError(f"--out {out} holds an earlier suite run; pass --resume to continue it, or another --out")
        now = _settings(args, k)
        diff = [key for key in RESUME_KEYS if earlier.get(key) != now.get(key)]
        if diff:
            raise ConfigError(f"--resume: {out} was run with other settings ({', '.join(f'{d}={earlier.get(d)!r}' for d in diff)})")
    return k, datasets, out, earlier


def run_suite(args) -> int:
    from tqdm.auto import tqdm

    from tokencredit.data import render_prompt
    from tokencredit.export import load_for_eval
    from tokencredit.rewards import MathVerifier

    k, datasets, out, earlier = _check(args)
    from tokencredit.model import resolve_device

    model, tok, src = load_for_eval(args.model, dtype=args.dtype, device=str(resolve_device(args.device)))
    if src.note:
        print(f"tokencredit: {src.note}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, k)
    (out / "suite.json").write_text(json.dumps(settings, indent=2) + "\n")
    if earlier is not None:
        print(f"tokencredit: resuming the suite run in {out}", flush=True)

    def render(text: str) -> str:
        body = args.prompt_template.replace("{problem}", text)
        return render_prompt(tok, body, args.system_prompt) if not args.no_chat_template else body

    summaries, values, metrics = [], {}, {}
    t_start = time.perf_counter()
    with MathVerifier(timeout_s=1) as verifier:
        for b, path, problems in datasets:
            n = args.n if b.metric == "avg" else args.pass1_n
            kb = k if b.metric == "avg" else 1
            label = metric_name(b, k)
            file = out / f"{b.key}.jsonl"
            done = read_rows(file)
            prompts = [render(p.prompt) for p in problems]
            lengths = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
            order = sorted(range(len(problems)), key=lambda i: (lengths[i], i))  # fixed by the file: same chunks on resume
            per_chunk = max(1, args.gen_batch_size // n)
            bar = tqdm(total=len(problems), initial=sum(1 for i in done if i < len(problems)), desc=b.column,
                       unit="problem", disable=args.quiet, dynamic_ncols=True)
            bar.set_postfix({label: f"{column_value(b, list(done.values()), kb):.3f}"} if done else {})
            with open(file, "a") as f:
                for s in range(0, len(order), per_chunk):
                    idx = order[s: s + per_chunk]
                    if all(i in done for i in idx):
                        continue
                    texts, lens, fin = sample_chunk(
                        model, tok, [prompts[i] for i in idx], [[sample_seed(args.seed, b.key, i, j) for j in range(n)] for i in idx],
                        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    )
                    rewards = verifier(texts, [problems[i].answer for i in idx for _ in range(n)])
                    for j, i in enumerate(idx):
                        if i in done:
                            continue  # regenerated only to keep the chunk as it was
                        rows = slice(j * n, (j + 1) * n)
                        rec = {"index": i, **_problem_record(problems[i].id, problems[i].answer, rewards[rows], lens[rows],
                                                             fin[rows], texts[rows], kb)}
                        f.write(json.dumps(rec) + "\n")
                        done[i] = rec
                        bar.update(1)
                    f.flush()  # an interruption loses at most the chunk in flight
                    bar.set_postfix({label: f"{column_value(b, list(done.values()), kb):.3f}"})
            bar.close()
            rows = {i: done[i] for i in range(len(problems)) if i in done}
            _write_sorted(file, rows)
            recs = list(rows.values())
            summary = summarize(recs, kb)
            summary.update({"name": b.key, "column": b.column, "metric": label, "value": column_value(b, recs, kb),
                            "data": str(path), "per_problem_file": file.name})
            summaries.append(summary)
            values[b.column], metrics[b.column] = summary["value"], label

    row = table_row(values)
    table = {"model": args.model, "model_loaded": src.describe, "suite": args.suite, "columns": list(row),
             "metrics": metrics, "percent": row, "left_out": [b.column for b in SUITES[args.suite] if b.column not in values],
             "settings": settings}
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(row, metrics, args.model))
    meta = {**settings, "model_loaded": src.describe, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_s_this_session": time.perf_counter() - t_start}
    (out / "summary.json").write_text(json.dumps({**meta, "datasets": summaries}, indent=2) + "\n")
    from tokencredit.tracking import send_eval_summary

    send_eval_summary(args.model, summaries)
    _print(row, metrics, args, out)
    return 0


def _print(row: dict[str, float], metrics: dict[str, str], args, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.suite} suite: T={args.temperature}, top-p={args.top_p}, max {args.max_new_tokens} tok (%)")
    t.add_column("model", no_wrap=True)
    for c in row:
        t.add_column(f"{c}\n{metrics[c]}" if c in metrics else c, justify="right", no_wrap=True)
    t.add_row(args.model, *(f"{v:.1f}" for v in row.values()))
    Console().print(t)
    Console().print(f"table.md, table.json and per-problem results in {out}")
