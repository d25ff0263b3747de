"""Benchmark: chunked `predicted_shift` vs two pairwise references.

What it does
    Times `tokencredit.probes.coupling.predicted_shift` (two chunked passes,
    O(N V d) time, O(chunk V + V d) memory) against
      * the factorised pairwise reference (kernel K = (H H^T) * (R R^T), Eq. 7;
        O(N^2 V) time, O(N V + N^2) memory), and
      * the literal Eq. 5 restricted to the LM head ("explicit"): every
        per-token gradient g_j = r_j h_j^T is materialised as a [V*d] vector
        (in blocks of --explicit-block tokens) and K_jk = <g_j, g_k> is an
        inner product of two such vectors, for every pair j <= k
        (O(N^2 V d / 2) time, O(block V d) memory),
    at SmolLM2-135M sizes (V = 49152, d = 576). Each (method, N) runs in its own
    subprocess which reports its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`,
    i.e. what the parent would read from RUSAGE_CHILDREN for that one child;
    tracemalloc cannot see torch allocations) and its RSS after loading the
    inputs, so "extra" is the memory the method itself needed. The high-water
    mark is reset after loading (/proc/self/clear_refs) so import and load
    transients do not hide a method's smaller peak.

Simplifications
    * Synthetic inputs: h is Gaussian, RMS-normalised (like a post-norm hidden
      state); W is Gaussian scaled so logits have std ~4; a log-Zipf unigram
      bias gives realistic repeats; o is *sampled* from the resulting policy
      (rollouts are samples), A is +-1 per 256-token "rollout".
    * Pairwise at N > --full-max (default 8192) would need R (N, V) and
      K (N, N) beyond what is sensible here, so it is run in row blocks with R
      stored once and only the first --frac of the row blocks timed; the
      total is extrapolated linearly in the number of row blocks (marked
      "extrap." in the table). Peak memory for those rows is the blocked
      variant's, not the full materialisation.
    * The explicit reference is always extrapolated: R (N, V) is computed in
      full and timed; then --explicit-pairs block pairs (a, c) are timed
      (materialise the c block, one [b, Vd] x [Vd, b] product, accumulate
      delta) after one a block, and the total is
      t_R + n_blocks * t(a block) + n_block_pairs * t(pair), with
      n_block_pairs = n_blocks (n_blocks + 1) / 2 (K is symmetric). Marked
      "extrap." in the table. A float64 check on a small case shows it gives
      the same delta as the other two.
    * Times are the best of --repeats runs (1 run at the largest sizes).

Try it
    .venv/bin/python bench/coupling_bench.py                 # N = 512 2048 8192
    .venv/bin/python bench/coupling_bench.py --ns 512 2048 8192 32768
    .venv/bin/python bench/coupling_bench.py --explicit-pairs 0      # skip the explicit column
    .venv/bin/python bench/coupling_bench.py --smoke     # tiny sizes (N = 64 128, V = 512, d = 32), every column; for CI (tests/test_scripts_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

V_DEFAULT, D_DEFAULT = 49152, 576  # SmolLM2-135M vocab and hidden size
REPO = Path(__file__).resolve().parents[1]


def make_inputs(n: int, V: int, d: int, seed: int = 0, chunk: int = 1024) -> dict:
    """Synthetic (h (N, d), W (V, d), bias (V,), o (N,), A (N,)) with a sane softmax."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    h = h / h.pow(2).mean(1, keepdim=True).sqrt()  # RMS-norm: ||h|| = sqrt(d)
    W = torch.randn(V, d, generator=g) * (4.0 / math.sqrt(d))  # logit std ~ 4
    ranks = torch.randperm(V, generator=g).double() + 1.0
    bias = (-1.1 * ranks.log()).float()  # log-Zipf unigram prior (up to a constant)
    bias = bias - bias.mean()
    o = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):  # o ~ pi: rollouts are samples of the policy
        pi = torch.softmax(h[s : s + chunk] @ W.T + bias, -1)
        o[s : s + chunk] = torch.multinomial(pi, 1, generator=g).squeeze(1)
    A = torch.where(torch.arange(n) // 256 % 2 == 0, 1.0, -1.0)  # +-1 per 256-token rollout
    return {"h": h, "W": W, "bias": bias, "o": o, "A": A}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pairwise_blocked(h, W, bias, o, A, eta, frac, block=1024):
    """Row-blocked O(N^2 V) pairwise delta; times only the first `frac` of blocks.

    R (N, V) is stored once (computed chunk-wise); row block b costs
    (h_b h^T) * (R_b R^T) (b, N). Returns (delta_partial, seconds, blocks_done, n_blocks).
    """
    N = h.shape[0]
    t0 = time.perf_counter()
    R = torch.empty(N, W.shape[0])
    for s in range(0, N, block):
        R[s : s + block] = torch.softmax(h[s : s + block] @ W.T + bias, -1)
    R.neg_()[torch.arange(N), o] += 1.0
    t_R = time.perf_counter() - t0
    n_blocks = math.ceil(N / block)
    todo = max(1, round(frac * n_blocks))
    delta = torch.zeros(N)
    t1 = time.perf_counter()
    for b in range(todo):
        sl = slice(b * block, min((b + 1) * block, N))
        K = (h[sl] @ h.T) * (R[sl] @ R.T)  # (b, N) Eq. 7
        delta[sl] = eta / N * (K @ A)  # Eq. 9
    t_rows = time.perf_counter() - t1
    return delta, t_R + t_rows * n_blocks / todo, todo, n_blocks


def _explicit_grads(R: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-token LM-head gradients g_j = r_j h_j^T flattened: R (b, V), h (b, d) -> (b, V*d)."""
    return (R[:, :, None] * h[:, None, :]).reshape(R.shape[0], -1)


def _explicit_blocked(h, W, bias, o, A, eta, n_pairs_timed, block=8, full=False):
    """Literal Eq. 5 on the LM head: K_jk = <g_j, g_k> with g_j materialised (V*d floats).

    R (N, V) is computed once (timed in full). Then, if `full`, every block
    pair (a <= c) is done and delta is exact (small sizes only); otherwise
    the first `n_pairs_timed` pairs of block row 0 are timed after
    materialising block 0, and the total is extrapolated to all
    n_blocks (n_blocks + 1) / 2 pairs plus n_blocks a-block materialisations.
    Returns (delta (N,) (partial unless full), seconds (extrapolated unless full), note).
    """
    N = h.shape[0]
    t0 = time.perf_counter()
    R = torch.empty(N, W.shape[0], dtype=h.dtype)
    for s in range(0, N, 1024):
        R[s : s + 1024] = torch.softmax(h[s : s + 1024] @ W.T + bias, -1)
    R.neg_()[torch.arange(N), o] += 1.0  # r_j = e_{o_j} - pi_j   (Eq. 6)
    t_R = time.perf_counter() - t0
    blocks = [slice(s, min(s + block, N)) for s in range(0, N, block)]
    nb = len(blocks)
    delta = torch.zeros(N, dtype=h.dtype)

    def pair(sa, Ga, sc):  # K block (a, c) = G_a G_c^T; delta_j += eta/N sum_k A_k K_jk both ways
        Gc = Ga if sc == sa else _explicit_grads(R[sc], h[sc])  # (b, V*d)
        K = Ga @ Gc.T  # (b, b) <g_j, g_k>   (Eq. 5, LM head only)
        delta[sa] += eta / N * (K @ A[sc])
        if sc != sa:
            delta[sc] += eta / N * (K.T @ A[sa])

    if full:
        t1 = time.perf_counter()
        for a, sa in enumerate(blocks):
            Ga = _explicit_grads(R[sa], h[sa])
            for sc in blocks[a:]:
                pair(sa, Ga, sc)
        return delta, t_R + time.perf_counter() - t1, "all pairs"
    t1 = time.perf_counter()
    Ga = _explicit_grads(R[blocks[0]], h[blocks[0]])
    t_a = time.perf_counter() - t1
    todo = min(max(1, n_pairs_timed), nb)
    t2 = time.perf_counter()
    for sc in blocks[1 : todo + 1] if nb > todo else blocks[:todo]:
        pair(blocks[0], Ga, sc)
    t_pair = (time.perf_counter() - t2) / todo
    n_block_pairs = nb * (nb + 1) // 2
    total = t_R + nb * t_a + n_block_pairs * t_pair
    return delta, total, f"extrap. {todo}/{n_block_pairs} block pairs (b={block})"


def worker(args) -> None:
    from tokencredit.probes.coupling import predicted_shift, predicted_shift_pairwise

    torch.set_num_threads(args.threads)
    x = torch.load(args.inputs)
    h, W, bias, o, A = x["h"], x["W"], x["bias"], x["o"], x["A"]
    try:  # reset the peak-RSS high-water mark so import/load transients don't count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0 = _rss_mb()
    times, cpus, note = [], [], ""
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        if args.method == "chunked":
            out = predicted_shift(h, W, o, A, 0.1, chunk_tokens=args.chunk, bias=bias)
        elif args.method == "pairwise":
            out = predicted_shift_pairwise(h, W, o, A, 0.1, bias=bias)
        elif args.method == "explicit":  # times are extrapolated inside
            _, dt, note = _explicit_blocked(h, W, bias, o, A, 0.1, args.explicit_pairs, args.explicit_block)
        else:  # pairwise_blocked: times are extrapolated inside
            _, dt, done, nb = _pairwise_blocked(h, W, bias, o, A, 0.1, args.frac)
            note = f"extrap. {done}/{nb} row blocks"
        dt_wall, dt_cpu = time.perf_counter() - t0, time.process_time() - c0
        if args.method in ("pairwise_blocked", "explicit"):  # scale both clocks by the same extrapolation
            dt_cpu, dt_wall = dt_cpu * dt / dt_wall, dt
        times.append(dt_wall)
        cpus.append(dt_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB on Linux
    res = {"time_s": min(times), "cpu_s": min(cpus), "peak_rss_mb": peak, "rss_inputs_mb": rss0, "note": note}
    if args.method == "chunked":
        counts = torch.bincount(o)
        res["input_stats"] = {
            "distinct_ids": int((counts > 0).sum()),
            "largest_group": int(counts.max()),
            "mean_p_own": float(out["p_own"].mean()),
            "mean_entropy": float(out["entropy"].mean()),
            "abs_mean_self_same_diff": [float(out[k].abs().mean()) for k in ("self_term", "same_token", "diff_token")],
        }
    print("RESULT " + json.dumps(res))


def run_child(method: str, n: int, inputs: str, args) -> dict:
    reps = args.repeats if n <= 2048 and method != "explicit" else 1
    cmd = [
        sys.executable, __file__, "--worker", "--method", method, "--inputs", inputs,
        "--repeats", str(reps), "--chunk", str(args.chunk), "--frac", str(args.frac),
        "--threads", str(args.threads), "--explicit-pairs", str(args.explicit_pairs),
        "--explicit-block", str(args.explicit_block),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{method} N={n} failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def check_agreement(n: int = 512, V: int = 4096, d: int = 64) -> float:
    """Max relative gap between chunked and pairwise deltas on a small float64 case."""
    from tokencredit.probes.coupling import predicted_shift, predicted_shift_pairwise

    x = make_inputs(n, V, d, seed=1)
    h, W, b = x["h"].double(), x["W"].double(), x["bias"].double()
    a = predicted_shift(h, W, x["o"], x["A"], 0.1, chunk_tokens=100, bias=b)["delta"]
    r = predicted_shift_pairwise(h, W, x["o"], x["A"], 0.1, bias=b)["delta"]
    return ((a - r).abs().max() / r.abs().max()).item()


def check_explicit(n: int = 96, V: int = 512, d: int = 32) -> float:
    """Max relative gap between the explicit per-pair-gradient delta (all pairs)
    and the factorised pairwise one, float64."""
    from tokencredit.probes.coupling import predicted_shift_pairwise

    x = make_inputs(n, V, d, seed=2, chunk=64)
    h, W, b = x["h"].double(), x["W"].double(), x["bias"].double()
    e, _, _ = _explicit_blocked(h, W, b, x["o"], x["A"].double(), 0.1, 0, block=8, full=True)
    r = predicted_shift_pairwise(h, W, x["o"], x["A"], 0.1, bias=b)["delta"]
    return ((e - r).abs().max() / r.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[512, 2048, 8192], help="token counts N")
    ap.add_argument("--vocab", type=int, default=V_DEFAULT)
    ap.add_argument("--dim", type=int, default=D_DEFAULT)
    ap.add_argument("--chunk", type=int, default=1024, help="rows per chunk for predicted_shift")
    ap.add_argument("--repeats", type=int, default=2, help="runs per point for N <= 2048 (best is kept)")
    ap.add_argument("--full-max", type=int, default=8192, help="largest N for the fully materialised pairwise")
    ap.add_argument("--frac", type=float, default=0.125, help="fraction of row blocks timed when extrapolating")
    ap.add_argument("--explicit-pairs", type=int, default=4,
                    help="block pairs timed for the explicit per-pair-gradient reference (0 = skip that column)")
    ap.add_argument("--explicit-block", type=int, default=8, help="tokens per materialised gradient block ([block, V*d] floats)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "--ns 64 128 --vocab 512 --dim 32 --chunk 32 --repeats 1 --full-max 64 --explicit-pairs 1 --threads 1 "
                         "(N=128 takes the row-blocked pairwise path; this script writes no files)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="chunked", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke and not args.worker:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(ns=[64, 128], vocab=512, dim=32, chunk=32, repeats=1, full_max=64, explicit_pairs=1, threads=1)
        args = ap.parse_args()
    if args.worker:
        return worker(args)

    print(f"coupling bench: V={args.vocab} d={args.dim} chunk={args.chunk} threads={args.threads} torch={torch.__version__}")
    print(f"float64 agreement check (N=512, V=4096, d=64): max rel gap {check_agreement():.1e}")
    if args.explicit_pairs > 0:
        print(f"float64 explicit-vs-pairwise check (N=96, V=512, d=32, all pairs): max rel gap {check_explicit():.1e}")
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ns:
            path = os.path.join(tmp, f"in_{n}.pt")
            torch.save(make_inputs(n, args.vocab, args.dim), path)
            c = run_child("chunked", n, path, args)
            pw_method = "pairwise" if n <= args.full_max else "pairwise_blocked"
            p = run_child(pw_method, n, path, args)
            e = run_child("explicit", n, path, args) if args.explicit_pairs > 0 else None
            rows.append((n, c, p, e))
            s = c["input_stats"]
            print(
                f"  N={n}: {s['distinct_ids']} distinct ids, largest group {s['largest_group']}, "
                f"mean p_own {s['mean_p_own']:.3f}, mean entropy {s['mean_entropy']:.2f} nats, "
                f"|self|,|same|,|diff| = {', '.join(f'{v:.2e}' for v in s['abs_mean_self_same_diff'])}",
                flush=True,
            )
            os.remove(path)
    hdr = (
        f"{'N':>6} | {'chunked':>7} {'':>7} {'peak':>6} {'extra':>6} | {'pairwise':>8} {'':>7} {'peak':>6} {'extra':>6} |"
        f" {'speedup':>7} {'speedup':>7} {'mem':>6} | note"
    )
    sub = (
        f"{'':>6} | {'wall s':>7} {'cpu s':>7} {'MB':>6} {'MB':>6} | {'wall s':>8} {'cpu s':>7} {'MB':>6} {'MB':>6} |"
        f" {'(cpu)':>7} {'(wall)':>7} {'ratio':>6} |"
    )
    print()
    print(hdr)
    print(sub)
    print("-" * len(hdr))
    for n, c, p, _ in rows:
        ce = c["peak_rss_mb"] - c["rss_inputs_mb"]
        pe = p["peak_rss_mb"] - p["rss_inputs_mb"]
        print(
            f"{n:>6} | {c['time_s']:>7.2f} {c['cpu_s']:>7.2f} {c['peak_rss_mb']:>6.0f} {ce:>6.0f} | "
            f"{p['time_s']:>8.2f} {p['cpu_s']:>7.2f} {p['peak_rss_mb']:>6.0f} {pe:>6.0f} | "
            f"{p['cpu_s'] / c['cpu_s']:>6.2f}x {p['time_s'] / c['time_s']:>6.2f}x {pe / max(ce, 1.0):>5.1f}x | {p['note']}"
        )
    if any(r[3] is not None for r in rows):
        hdr2 = (f"{'N':>6} | {'explicit per-pair LM-head grads':^31} | {'speedup of chunked vs':^23} | note")
        sub2 = (f"{'':>6} | {'wall s':>9} {'cpu s':>9} {'extra MB':>10} | {'explicit':>11} {'pairwise':>11} |")
        print()
        print(hdr2)
        print(sub2)
        print("-" * len(hdr2))
        for n, c, p, e in rows:
            if e is None:
                continue
            ee = e["peak_rss_mb"] - e["rss_inputs_mb"]
            print(
                f"{n:>6} | {e['time_s']:>9.0f} {e['cpu_s']:>9.0f} {ee:>10.0f} | "
                f"{e['cpu_s'] / c['cpu_s']:>10.0f}x {p['cpu_s'] / c['cpu_s']:>10.2f}x | {e['note']}"
            )
        print("(explicit times are extrapolated from the timed block pairs, see the module docstring; speed-ups on cpu s)")
    print("(peak = process peak RSS; extra = peak minus RSS after loading inputs; cpu = process CPU seconds,")
    print(" less sensitive than wall time to other jobs sharing the machine)")
    print(f"\ntotal bench wall time {time.perf_counter() - t_start:.0f} s")
    print(
        "\ncost model: chunked ~ 4 matmuls of N*V*d (logits twice, G, G h); pairwise ~ N*V*d + N^2*V + N^2*d,\n"
        f"so the flop ratio is ~ (N + d) / (4 d): {', '.join(f'N={n}: {(n + args.dim) / (4 * args.dim):.1f}x' for n in args.ns)}\n"
        "explicit ~ N*V*d (R) + N^2*V*d/2 multiply-adds over materialised gradients, so ~ N/8 flops vs chunked: "
        f"{', '.join(f'N={n}: {n / 8:.0f}x' for n in args.ns)} (and memory-bound, so more in time)"
    )
    if len(rows) >= 2:
        # Least-squares fits on CPU seconds: chunked ~ c*N, pairwise ~ a*N + b*N^2.
        ns = torch.tensor([float(r[0]) for r in rows], dtype=torch.float64)
        tc = torch.tensor([r[1]["cpu_s"] for r in rows], dtype=torch.float64)  # rows: (N, chunked, pairwise, explicit)
        tp = torch.tensor([r[2]["cpu_s"] for r in rows], dtype=torch.float64)
        c_lin = float((ns * tc).sum() / (ns * ns).sum())
        ab = torch.linalg.lstsq(torch.stack([ns, ns * ns], 1), tp[:, None]).solution.view(-1)
        a_lin, b_sq = float(ab[0]), float(ab[1])
        print("projection from these fits (cpu s; chunked = c N, pairwise = a N + b N^2), NOT measured:")
        if c_lin <= 0 or b_sq <= 0:  # e.g. --smoke: sizes too small / timings too noisy for a quadratic fit
            print(f"  (no projection: the fit has c = {c_lin:.3g}, b = {b_sq:.3g}; a positive c and b need larger, less noisy N)")
        else:
            for n in (32768, 131072, 262144, 524288):
                pc, pp = c_lin * n, a_lin * n + b_sq * n * n
                print(f"  N={n:>6}: chunked ~{pc:8.0f} s, pairwise ~{pp:9.0f} s, speedup ~{pp / pc:5.1f}x")
        if b_sq > 0 and c_lin > a_lin:
            print(f"  speedup reaches 100x near N ~ {(100 * c_lin - a_lin) / b_sq:,.0f} tokens")


if __name__ == "__main__":
    main()
