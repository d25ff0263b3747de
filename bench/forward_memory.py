"""Peak memory and time of one forward+backward: naive full logits vs chunked
`forward_tokens`.

What: a narrow Llama (hidden 64, 2 layers) with SmolLM2's real vocabulary size
(49152), so the `[N, V]` logits dominate memory exactly as they do for small
real models. Each variant computes per-token log-probs and entropies of a
16 x 256-token response batch (32-token prompts), then backpropagates
sum(logprob * mask).

How: every variant runs in a fresh subprocess (torch's CPU allocator is not
visible to tracemalloc, and a process never gives its peak back); the child
reports its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) before and after
the measured step, and the difference is the step's peak extra memory. The
loss value is printed so the variants can be seen to agree.

Simplifications: CPU only, wall-clock time on a possibly shared machine (the
ratios, not the absolute seconds, are the point); the decoder body is tiny on
purpose, so its activations are a small constant in every row.

Try it:
    .venv/bin/python bench/forward_memory.py                 # full table
    .venv/bin/python bench/forward_memory.py --rows 4 --resp 64   # quick
    .venv/bin/python bench/forward_memory.py --smoke     # tiny model (V=4096, H=32), 2 rows, 1 repeat; for CI (tests/test_scripts_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ["naive", "chunk=4096", "chunk=1024", "chunk=256"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB -> MiB


def _small(batch):
    """A 1-row, 4+4-token copy of `batch` for warm-up."""
    from tokencredit.batch import RolloutBatch

    return RolloutBatch(
        prompt_ids=batch.prompt_ids[:1, -4:],  # [1, 4]
        prompt_mask=batch.prompt_mask[:1, -4:],
        response_ids=batch.response_ids[:1, :4],  # [1, 4]
        response_mask=batch.response_mask[:1, :4],
        group_id=batch.group_id[:1],
    )


def child(variant: str, rows: int, prompt: int, resp: int, vocab: int, hidden: int, repeats: int) -> dict:
    """Run one variant in this process and return its measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokencredit.batch import RolloutBatch
    from tokencredit.model.forward import forward_tokens, naive_token_logprobs

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=prompt + resp + 8,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).train()
    g = torch.Generator().manual_seed(1)
    batch = RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (rows, prompt), generator=g),  # [B, P]
        prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
        response_ids=torch.randint(3, vocab, (rows, resp), generator=g),  # [B, T]
        response_mask=torch.ones(rows, resp),
        group_id=torch.arange(rows),
    )

    def step(b: RolloutBatch) -> float:
        if variant == "naive":
            out = naive_token_logprobs(model, b, temperature=1.0)
        else:
            chunk = int(variant.split("=")[1])
            out = forward_tokens(model, b, temperature=1.0, chunk_tokens=chunk, with_entropy=True)
        mask = b.response_mask  # [B, T]
        loss = -(out["logprob"] * mask).sum() / mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    # warm-up on one short row: loads kernels and thread pools outside the measurement
    step(_small(batch))
    before = _peak_mb()
    times = []
    loss = float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step(batch)
        times.append(time.perf_counter() - t0)
    after = _peak_mb()
    return {
        "variant": variant,
        "tokens": rows * resp,
        "base_mb": before,
        "peak_mb": after,
        "step_mb": after - before,
        "time_s": min(times),
        "loss": loss,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--resp", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "--rows 2 --prompt 8 --resp 128 --vocab 4096 --hidden 32 --repeats 1, every variant "
                         "(this script writes no files)")
    a = ap.parse_args()
    if a.smoke and not a.child:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(rows=2, prompt=8, resp=128, vocab=4096, hidden=32, repeats=1)
        a = ap.parse_args()
    shape = dict(rows=a.rows, prompt=a.prompt, resp=a.resp, vocab=a.vocab, hidden=a.hidden, repeats=a.repeats)

    if a.child:
        print(json.dumps(child(a.child, **shape)))
        return 0

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results, failed = [], []
    for v in a.variants.split(","):
        args = [sys.executable, os.path.abspath(__file__), "--child", v] + [
            f"--{k}={val}" for k, val in shape.items()
        ]
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{v}: failed (rc {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            failed.append(v)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    import torch

    print(
        f"forward+backward of per-token logprob+entropy: B={a.rows} P={a.prompt} T={a.resp} "
        f"(N={a.rows * a.resp} tokens), V={a.vocab}, H={a.hidden}, 2 layers, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {a.repeats}"
    )
    full_logits_mb = a.rows * (a.prompt + a.resp) * a.vocab * 4 / 2**20
    print(f"one fp32 [B, L, V] logits tensor = {full_logits_mb:.0f} MiB")
    naive = next((r for r in results if r["variant"] == "naive"), None)
    hdr = f"{'variant':<12} {'peak RSS MiB':>12} {'step MiB':>9} {'mem ratio':>9} {'time s':>7} {'time ratio':>10} {'loss':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        mr = f"{r['step_mb'] / naive['step_mb']:.3f}" if naive and naive["step_mb"] > 0 else "-"  # 0: the step stayed under the warm-up peak
        tr = f"{r['time_s'] / naive['time_s']:.2f}" if naive else "-"
        print(
            f"{r['variant']:<12} {r['peak_mb']:>12.0f} {r['step_mb']:>9.0f} {mr:>9} "
            f"{r['time_s']:>7.2f} {tr:>10} {r['loss']:>10.5f}"
        )
    print("step MiB = peak RSS during the measured steps minus peak RSS before them; ratios are vs naive")
    if failed:
        print(f"failed variants: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
