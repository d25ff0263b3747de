"""Peak memory of one training step, float32 vs bf16 compute (float32 master weights).

What: the trainer's `optimizer_step` (AdamW, policy loss, chunked LM head) at lr 1e-6 on
a batch of `--rows` rows, each its own prompt of `--prompt` tokens and a response
of T tokens, for model.dtype float32 and bfloat16 (tokencredit/model/precision.py:
the parameters, gradients and AdamW state are float32 either way; bf16 runs the
forwards under torch.autocast), and a control with bf16 parameters (what
model.dtype=bfloat16 did before: no float32 masters). Printed per model and dtype:
  - moved: the fraction of weight elements (with a nonzero gradient) that the
    step changed, min and mean over the 2-D weights;
  - state: bytes the gradients + AdamW moments add, measured (RSS after a
    warm-up step minus RSS after loading, so the weights are not in it) and
    expected (12 bytes per parameter: 4 gradient + 8 AdamW; 16 with the 4-byte
    float32 weights);
  - activations per token: the step's extra peak RSS at two response lengths;
    its slope over the decoder tokens (rows * (prompt + T)) is the memory per
    token;
  - k = that slope / (L * (H + I)) bytes, L layers, H hidden size, I MLP width:
    the coefficient README "Scaling out" scales to other shapes (an estimate:
    the ratio of attention to MLP tensors differs from model to model).

How: every (model, dtype, T) runs in a fresh subprocess; peak RSS from
getrusage (a process never gives its peak back). CPU only; the ratios and
slopes are the point, not the seconds.

Try it:
    .venv/bin/python bench/precision_memory.py                       # tiny + SmolLM2 (~4 min on 2 cores)
    .venv/bin/python bench/precision_memory.py --models tiny --resp 16,32   # seconds
    .venv/bin/python bench/precision_memory.py --smoke     # tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODELS = {"tiny": "tiny-random", "smollm2": "smollm2-135m-instruct"}
PURE_BF16 = "bf16-params"  # control arm: bf16 parameters and AdamW over them (no float32 masters)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB -> MiB


def _batch(rows: int, prompt: int, resp: int, vocab: int, seed: int = 1):
    import torch

    from tokencredit.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    return RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (rows, prompt), generator=g),  # (B, P) every row its own prompt
        prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
        response_ids=torch.randint(3, vocab, (rows, resp), generator=g),  # (B, T)
        response_mask=torch.ones(rows, resp),
        group_id=torch.arange(rows),
        advantage=torch.randn(rows, generator=g),  # (B,)
    )


def child(model_name: str, dtype: str, rows: int, prompt: int, resp: int, chunk: int) -> dict:
    import torch

    from tokencredit.model import load_model
    from tokencredit.model.forward import forward_rows
    from tokencredit.model.precision import master_dtype, set_compute_dtype
    from tokencredit.update import LossSpec, micro_batches, optimizer_step

    if dtype == PURE_BF16:  # the old recipe: bf16 parameters, optimizer over them
        model, _ = load_model(MODELS[model_name], dtype="bfloat16")
    else:
        model, _ = load_model(MODELS[model_name], dtype=master_dtype(dtype))
        set_compute_dtype(model, dtype)
    loaded = _rss_mb()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = model.config.vocab_size
    spec = LossSpec()

    def step(b) -> float:
        b.old_logprob = forward_rows(model, b, micro_rows=len(b), with_entropy=False, chunk_tokens=chunk)["logprob"]
        t0 = time.perf_counter()
        optimizer_step(model, opt, micro_batches(b, len(b)), spec, chunk_tokens=chunk)
        return time.perf_counter() - t0

    step(_batch(1, 4, 4, vocab, seed=2))  # warm-up: AdamW state and gradients exist from here on
    warm = _rss_mb()
    b = _batch(rows, prompt, resp, vocab)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    secs = step(b)
    peak = _rss_mb()
    moved = [float((p.detach() != before[n])[p.grad != 0].float().mean()) for n, p in model.named_parameters()
             if p.dim() == 2 and p.grad is not None and (p.grad != 0).any()]
    L, H, I = model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size
    return dict(model=model_name, dtype=dtype, params=params, L=L, H=H, I=I, V=vocab, tokens=rows * (prompt + resp),
                state_mb=warm - loaded, step_mb=peak - warm, step_s=secs, moved_min=min(moved), moved_mean=sum(moved) / len(moved))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--resp", default="64,256", help="two response lengths (the per-token slope is between them)")
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "--models tiny --resp 8,16 --rows 2 (this script writes no files)")
    a = ap.parse_args()
    if a.smoke and not a.child:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(models="tiny", resp="8,16", rows=2)
        a = ap.parse_args()
    if a.child:
        name, dtype, resp = a.child.split(":")
        print(json.dumps(child(name, dtype, a.rows, a.prompt, int(resp), a.chunk_tokens)))
        return 0
    lengths = [int(x) for x in a.resp.split(",")]
    if len(lengths) != 2 or lengths[0] >= lengths[1]:
        ap.error("--resp takes two increasing lengths, e.g. 64,256")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    import torch

    print(f"one optimizer_step (AdamW, chunked LM head {a.chunk_tokens}), {a.rows} rows x (prompt {a.prompt} + response T), "
          f"every row its own prompt; torch {torch.__version__}, {torch.get_num_threads()} threads; fresh process per row")
    hdr = (f"{'model':<8} {'dtype':<11} {'params M':>8} {'state MiB':>9} {'12 B/param':>10} {'T':>4} {'tokens':>6} {'step MiB':>8} "
           f"{'step s':>6} {'moved':>11} {'KiB/token':>9} {'k = B/token/(L(H+I))':>20}")
    print(hdr)
    print("-" * len(hdr))
    for name in a.models.split(","):
        for dtype in ("float32", "bfloat16", PURE_BF16):
            runs = []
            for T in lengths:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name}:{dtype}:{T}", f"--rows={a.rows}",
                       f"--prompt={a.prompt}", f"--chunk-tokens={a.chunk_tokens}"]
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    print(f"{name} {dtype} T={T}: failed (rc {p.returncode})\n{p.stderr[-1500:]}", file=sys.stderr)
                    return 1
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            r0, r1 = runs
            slope = (r1["step_mb"] - r0["step_mb"]) / (r1["tokens"] - r0["tokens"])  # MiB per token
            k = slope * 2**20 / (r0["L"] * (r0["H"] + r0["I"]))  # bytes per token per unit of L * (H + I)
            for i, r in enumerate(runs):
                tail = f"{slope * 1024:>9.1f} {k:>20.1f}" if i == 1 else ""
                print(f"{name:<8} {dtype:<11} {r['params'] / 1e6:>8.1f} {r['state_mb']:>9.0f} {12 * r['params'] / 2**20:>10.0f} "
                      f"{lengths[i]:>4} {r['tokens']:>6} {r['step_mb']:>8.0f} {r['step_s']:>6.2f} "
                      f"{r['moved_min']:>5.3f}/{r['moved_mean']:<5.3f} {tail}")
    print("state MiB = RSS after a warm-up step - RSS after loading (gradients + AdamW moments: 12 of the 16 B/param; "
          "the weights were loaded before); step MiB = the measured step's extra peak RSS; KiB/token = its slope between "
          "the two lengths. moved = min/mean over 2-D weights of the fraction of elements with a nonzero gradient that "
          "the AdamW step at lr 1e-6 changed. bf16-params: the control without float32 masters. The tiny model's "
          "memory numbers are allocator and kernel overhead, not its (few KB of) tensors.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
