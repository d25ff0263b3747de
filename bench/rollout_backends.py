"""HF generate vs vLLM: generated tokens per second on the same prompts, model and
lengths, side by side in one run.

Rows (each a full generate over the same rendered prompts, greedy by default so
that exact variants produce the same tokens and the same token count):

    hf dynamic           transformers DynamicCache; rows of one prompt share one prefill
    hf static            StaticCache (cache_implementation="static")
    hf auto              what the trainer and `tokencredit eval` use (rollout.hf_cache=auto)
    hf dynamic sorted    prompts sorted by length before batching (less left padding)
    hf static sorted
    vllm                 the colocated engine of rollout/vllm.py (skipped when vllm is absent;
                         engine start-up is timed apart)

Two settings: `rl` = the embedded default's rollout (4 arithmetic prompts x 8
responses, 32 new tokens); `eval` = the first K MATH-500 problems (../shared/data/
benchmarks/math500.jsonl or --math500), 1 response each. Each row says whether its
tokens equal the first row's (greedy only).

    python bench/rollout_backends.py                                  # both settings, SmolLM2, 2 threads
    python bench/rollout_backends.py --settings eval --max-new-tokens 256 --problems 8
    python bench/rollout_backends.py --device cuda --dtype bfloat16     # on a GPU box (hf rows; vllm if installed)
    python bench/rollout_backends.py --smoke   # tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py)

Results: docs/results/rollout_backends.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MATH500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks" / "math500.jsonl"


def _prompts(setting: str, tok, args) -> tuple[list[str], int]:
    from tokencredit.data import arithmetic_problems, render_prompt

    if setting == "rl":
        return [render_prompt(tok, p.prompt) for p in arithmetic_problems(4, seed=0, difficulty=1)], 8
    path = Path(args.math500)
    if not path.is_file():
        raise SystemExit(f"bench: {path} not found (pass --math500 FILE, a jsonl with a 'problem' field)")
    qs = [json.loads(line)["problem"] for line in path.read_text().splitlines() if line.strip()][: args.problems]
    return [render_prompt(tok, q) for q in qs], 1


def _hf(model, tok, prompts, n, args, cache: str, sort: bool):
    from tokencredit.rollout.hf import generate_hf

    order = sorted(range(len(prompts)), key=lambda i: len(tok(prompts[i])["input_ids"])) if sort else list(range(len(prompts)))
    torch.manual_seed(0)
    t = time.perf_counter()
    b = generate_hf(model, tok, [prompts[i] for i in order], n=n, temperature=args.temperature, top_p=1.0,
                    max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, cache=cache)
    dt = time.perf_counter() - t
    texts = [r[m.bool()].tolist() for r, m in zip(b.response_ids, b.response_mask)]  # rows in `order`
    at = {p: j for j, p in enumerate(order)}  # prompt -> its position in the sorted call
    resp = [texts[at[i] * n + k] for i in range(len(prompts)) for k in range(n)]  # back to prompt order
    return b.num_tokens, dt, 0.0, resp


def _vllm(model, tok, prompts, n, args):
    from tokencredit.config import load_config
    from tokencredit.rollout.vllm import VLLMSampler

    # the engine's context: 4096 prompt tokens, or what the model's positions leave (a small test model)
    max_prompt = min(4096, getattr(model.config, "max_position_embeddings", 8192) - args.max_new_tokens)
    cfg = load_config(None, [f"rollout.n={n}", f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.temperature={args.temperature}",
                             f"model.dtype={args.dtype}", f"data.max_prompt_tokens={max_prompt}"])
    t = time.perf_counter()
    s = VLLMSampler(model, tok, cfg)
    start = time.perf_counter() - t
    t = time.perf_counter()
    b = s.generate(prompts, [""] * len(prompts), group_offset=0, policy_version=0)
    dt = time.perf_counter() - t
    resp = [r[m.bool()].tolist() for r, m in zip(b.response_ids, b.response_mask)]
    del s
    return b.num_tokens, dt, start, resp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--settings", nargs="+", choices=("rl", "eval"), default=["rl", "eval"])
    ap.add_argument("--problems", type=int, default=32, help="MATH-500 problems in the eval setting")
    ap.add_argument("--math500", default=str(DEFAULT_MATH500))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--gen-batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (rows comparable token for token)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip", nargs="*", default=[], help="row names to skip, e.g. 'vllm' 'hf dynamic sorted'")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "a random Llama with head size 64 (one vLLM's CPU kernels serve) saved to a temp dir, the rl "
                         "setting, 4 new tokens, 1 thread")
    args = ap.parse_args()
    if args.smoke:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(model=None, settings=["rl"], max_new_tokens=4, threads=1)
        args = ap.parse_args()
        if args.model is None:
            from tokencredit.model import save_model
            from tokencredit.model.tiny import build_tiny

            args.model = tempfile.mkdtemp(prefix="rollout_backends-smoke-")
            save_model(*build_tiny(hidden=128, heads=2, layers=2, tie=False), args.model)
    torch.set_num_threads(args.threads)
    from tokencredit.model import load_model

    has_vllm = False
    if "vllm" not in args.skip:  # the vllm row runs only where `import vllm` works; otherwise one line says why
        try:
            import vllm  # noqa: F401
            has_vllm = True
        except ImportError as e:
            why = "vllm is not installed" if getattr(e, "name", None) == "vllm" else f"import vllm failed: {e}"
            print(f"vllm row skipped: {why}")

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    print(f"rollout backends: {args.model} on {args.device} ({platform.machine()}, {args.threads} threads, torch {torch.__version__}), "
          f"{args.dtype}, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, {time.strftime('%Y-%m-%d %H:%M')}")
    rows = [("hf dynamic", "dynamic", False), ("hf static", "static", False), ("hf auto", "auto", False),
            ("hf dynamic sorted", "dynamic", True), ("hf static sorted", "static", True)]
    # untimed warm-up (first-call allocations would otherwise land on the first row)
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
    _hf(model, tok, _prompts(args.settings[0], tok, args)[0][:2], 1, warm, "dynamic", False)
    results = {}
    for setting in args.settings:
        prompts, n = _prompts(setting, tok, args)
        results[setting] = [(name, *_hf(model, tok, prompts, n, args, c, srt)) for name, c, srt in rows if name not in args.skip]
    # vLLM last: on CPU its engine binds threads and memory of this process, which would colour later HF rows
    if has_vllm and "vllm" not in args.skip:
        for setting in args.settings:
            prompts, n = _prompts(setting, tok, args)
            results[setting].append(("vllm", *_vllm(model, tok, prompts, n, args)))
    for setting in args.settings:
        prompts, n = _prompts(setting, tok, args)
        plen = [len(tok(p)["input_ids"]) for p in prompts]
        print(f"\n[{setting}] {len(prompts)} prompts x {n} (prompt tokens {min(plen)}-{max(plen)}, mean {sum(plen) / len(plen):.0f})")
        print(f"{'row':<20}{'tokens':>8}{'gen s':>9}{'tok/s':>9}{'vs first':>10}{'same tokens':>13}{'start s':>9}")
        first = None
        for name, ntok, dt, start, resp in results[setting]:
            rate = ntok / dt
            first = first or (rate, resp)
            same = "yes" if resp == first[1] else "no"
            print(f"{name:<20}{ntok:>8}{dt:>9.1f}{rate:>9.1f}{rate / first[0]:>9.2f}x{same:>13}{start:>9.1f}", flush=True)
    print(f"\nrollout backends: done, {sum(len(r) for r in results.values())} rows")

if __name__ == "__main__":
    main()
