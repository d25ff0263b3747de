"""Speed-up of the token-value probe's shared-prefix continuations (Eq. 20, App. E.2).

What: the 2M continuations of one token (M from s_t + o_t, M from s_t; alt=False: the probe adds M alternative-branch rows) made
three ways by `tokencredit.probes.value.branch_continuations`:
  shared      prefix s_t encoded once; its KV cache repeated over the 2M rows;
              one generate call computes only new tokens (what the probe uses)
  batched     one generate call over the 2M rows, each re-encoding the prefix
  sequential  one generate call per continuation (2M calls, each re-encoding)
Decoding is greedy so every mode does identical work and must produce
identical tokens (checked and printed). Time = median of --reps runs, modes
interleaved; wall-clock and process CPU time (CPU time is steadier when
other jobs share the machine).

Simplifications: CPU wall-clock on a possibly shared machine (the ratios are
the point); EOS may end a row early, identically in every mode; the prefix is
a real chat prompt padded with filler text to --prefix-len tokens.

Try it:
    .venv/bin/python bench/value_cache_bench.py                       # tiny-random, then SmolLM2-135M if installed
    .venv/bin/python bench/value_cache_bench.py --models tiny-random --prefix-len 256 --M 8 --new-tokens 16
    .venv/bin/python bench/value_cache_bench.py --smoke   # tiny-random only, prefix 32, M 2, 4 new tokens, 1 rep; for CI (tests/test_scripts_smoke.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tokencredit.probes.value import MODES, branch_continuations


def make_prefix(tok, n: int) -> torch.Tensor:
    """(n,) ids: a chat prompt and an assistant answer cut to n tokens."""
    msg = [{"role": "user", "content": "Compute 17 * 23 + 5. Put the final answer in \\boxed{}."}]
    text = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    text += "Let us compute step by step. First, 17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391. " * 40
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise ValueError(f"prefix text has only {len(ids)} tokens")
    return torch.tensor(ids[:n])


def bench_model(name: str, prefix_len: int, M: int, new_tokens: int, reps: int) -> list[str]:
    from tokencredit.model import ModelLoadError, load_model
    from tokencredit.rollout.hf import eos_token_ids

    try:
        model, tok = load_model(name)
    except ModelLoadError as e:  # e.g. SmolLM2 not installed: skip this model; any other error is a bug and propagates
        return [f"{name}: skipped ({e})"]
    prefix = make_prefix(tok, prefix_len)
    eos = eos_token_ids(tok, model)
    o_t = int(prefix[-1])  # any token works; greedy continuations are compared across modes
    kw = dict(max_new_tokens=new_tokens, temperature=0.0, eos_ids=eos, pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0])
    branch_continuations(model, prefix[:-1], o_t, M, mode="shared", alt=False, **kw)  # warm-up
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    toks = {}
    for _ in range(reps):  # modes interleaved, so a load change on a shared machine hits all of them
        for mode in MODES:
            t0, c0 = time.perf_counter(), time.process_time()
            r = branch_continuations(model, prefix[:-1], o_t, M, mode=mode, alt=False, **kw)
            wall[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
            toks[mode] = r["tokens"]
    w = {m: statistics.median(v) for m, v in wall.items()}
    c = {m: statistics.median(v) for m, v in cpu.items()}
    same = toks["shared"] == toks["batched"] == toks["sequential"]
    gen = sum(len(t) for t in toks["shared"])
    lines = [f"{name}: prefix {prefix_len} tokens, 2M = {2 * M} continuations x <= {new_tokens} new tokens "
             f"({gen} generated), median of {reps}; identical tokens in all modes: {same}",
             f"  {'mode':<11} {'wall s':>8} {'CPU s':>8}   shared is faster by (wall / CPU)"]
    for mode in MODES:
        lines.append(f"  {mode:<11} {w[mode]:8.2f} {c[mode]:8.2f}   {w[mode] / w['shared']:5.2f}x / {c[mode] / c['shared']:5.2f}x")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m-instruct"])
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "--models tiny-random --prefix-len 32 --M 2 --new-tokens 4 --reps 1 (this script writes no files)")
    a = ap.parse_args()
    if a.smoke:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(models=["tiny-random"], prefix_len=32, M=2, new_tokens=4, reps=1)
        a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in a.models:
        print("\n".join(bench_model(name, a.prefix_len, a.M, a.new_tokens, a.reps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
