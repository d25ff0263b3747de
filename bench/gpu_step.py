"""Time of the trainer's update step on one GPU, and the TFLOP/s it achieves.

What: one GRPO update step as the trainer runs it, on a real architecture with
random weights (default: a Qwen2-1.5B-shaped `Qwen2Config`, bf16 compute over
float32 master weights, as the trainer runs model.dtype=bfloat16). Per step:
  1. old log-probs: `forward_tokens` under `torch.no_grad()` over all rows, in
     micro-batches of `--micro` rows (the trainer's pre-update forward);
  2. `optimizer_step` (AdamW, grad clip 1.0, default `LossSpec`) over the same
     micro-batches: forward + backward of the clipped policy loss, then step.
The batch is synthetic: `--prompts` prompts x G=8 rollouts, prompts of
`--prompt-len` tokens (the G rows of a group share one), responses of
`--response-len` tokens, random advantages. `--warmup` untimed steps, then
`--steps` timed ones, with `torch.cuda.synchronize()` around each part.

FLOPs per step = 2 x params x (no-grad forward tokens) + 6 x params x (trained
tokens), with params = ALL parameters (embeddings and the tied LM head
included) and tokens = real (non-padding) tokens fed to the decoder, counted by
a hook on the decoder in the warm-up step. `forward_tokens` runs the distinct
prompts once and the G responses against a copy of their KV cache, so a group
counts P + G*T tokens, not G*(P+T). Approximations: attention score/value
products are not counted; the LM head runs on response tokens only but is
counted on every token; recomputation is not counted (the gradient-checkpointed LM-head chunks always;
the decoder too with --grad-ckpt). Ratio is to 790 TFLOP/s, the bf16 matmul
rate measured on an H200 (8192^3 products); peak memory is
`torch.cuda.max_memory_allocated()` over the timed steps.

Needs: torch and transformers (with its own needs: huggingface_hub, tokenizers,
safetensors, numpy, packaging, pyyaml, regex, tqdm, typer); NOT pydantic or
math-verify (only tokencredit.batch / .update / .model.forward / .model.precision / .algo.losses
are imported, and they import torch alone). The nvidia-h200 image already has
transformers 5.17, tokenizers, safetensors and huggingface_hub, so nothing is
carried. Elsewhere, carry wheels: transformers and huggingface_hub are pure
Python; tokenizers, safetensors, regex and pyyaml have compiled parts (download
the manylinux x86_64 cp312 wheels, see the device README).

Run (repo root):
    python3 bench/gpu_step.py --out $OUT/gpu_step.jsonl             # H200 (est. 1-2 min)
    .venv/bin/python bench/gpu_step.py --model tiny --device cpu \\
        --prompts 2 --prompt-len 16 --response-len 16 --steps 1    # CPU smoke
    .venv/bin/python bench/gpu_step.py --smoke    # the same CPU smoke, JSON line to a temp dir; for CI (tests/test_scripts_smoke.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from tokencredit.batch import RolloutBatch  # noqa: E402
from tokencredit.model.forward import forward_tokens  # noqa: E402
from tokencredit.model.precision import master_dtype, set_compute_dtype  # noqa: E402
from tokencredit.update import LossSpec, micro_batches, optimizer_step  # noqa: E402

G = 8  # rollouts per prompt
PEAK_TFLOPS = 790.0  # bf16 matmul rate measured on the H200 (8192^3, torch)

MODELS = {
    # Qwen2-1.5B's shape (random weights)
    "qwen2-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6),
    # a few MB, for a CPU smoke run
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=4096, tie_word_embeddings=True),
}


def build_model(name: str, device: str, dtype: torch.dtype, attn: str, max_len: int):
    """Random-weight Qwen2 causal LM `name` on `device`, eval mode."""
    try:
        from transformers import AutoModelForCausalLM, Qwen2Config
    except ImportError as e:
        sys.exit(f"gpu_step: transformers is missing ({e}); carry the wheels listed in this script's docstring")
    cfg = Qwen2Config(**MODELS[name], max_position_embeddings=max(max_len, 4096), attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (fast for 1.5B params)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def synthetic_batch(prompts: int, P: int, T: int, T_min: int, vocab: int) -> RolloutBatch:
    """`prompts` x G rows on the CPU, rows of one group adjacent and sharing one prompt."""
    g = torch.Generator().manual_seed(1)
    B = prompts * G
    prompt_ids = torch.randint(1, vocab, (prompts, P), generator=g).repeat_interleave(G, 0)  # (B, P)
    lens = torch.randint(T_min, T + 1, (B,), generator=g)  # (B,) response lengths
    response_mask = (torch.arange(T)[None, :] < lens[:, None]).float()  # (B, T)
    response_ids = torch.randint(1, vocab, (B, T), generator=g) * response_mask.long()  # (B, T), pad id 0
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=response_ids, response_mask=response_mask,
        group_id=torch.arange(prompts).repeat_interleave(G),  # (B,)
        advantage=torch.randn(B, generator=g),  # (B,)
    )


class TokenCounter:
    """Forward pre-hook on the decoder body: adds up the real tokens it is fed,
    per phase (the shared-prompt pass feeds prompts and responses separately)."""

    def __init__(self):
        self.phase, self.tokens = None, {}

    def __call__(self, _mod, _args, kw):
        if self.phase is None:
            return
        n = kw["input_ids"].shape[1]
        real = int(kw["attention_mask"][:, -n:].sum())  # the mask of a cached pass also covers the prompt
        self.tokens[self.phase] = self.tokens.get(self.phase, 0) + real


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model, opt, batch: RolloutBatch, a, spec: LossSpec, counter: TokenCounter, device: str) -> tuple[float, float]:
    """One update step; returns (no-grad forward seconds, optimizer_step seconds)."""
    sync(device)
    t0 = time.perf_counter()
    counter.phase = "nograd"
    old = torch.zeros(batch.response_ids.shape, device=device)  # (B, T)
    with torch.no_grad():
        for s in range(0, len(batch), a.micro):
            u = batch.select(range(s, min(len(batch), s + a.micro))).to(device)
            lp = forward_tokens(model, u, chunk_tokens=a.chunk_tokens, with_entropy=False)["logprob"]  # (b, t)
            old[s : s + lp.shape[0], : lp.shape[1]] = lp
    batch.old_logprob = old
    sync(device)
    t1 = time.perf_counter()
    counter.phase = "trained"
    optimizer_step(model, opt, micro_batches(batch, a.micro), spec, chunk_tokens=a.chunk_tokens,
                   grad_clip=1.0, train_mode=a.grad_ckpt)
    sync(device)
    counter.phase = None
    return t1 - t0, time.perf_counter() - t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2-1.5b", help="architecture (random weights)")
    ap.add_argument("--device", default="cuda", help="torch device (cuda, cuda:1, cpu)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="compute dtype (model.dtype; default: bfloat16 on cuda, float32 on cpu); parameters and "
                         "AdamW state are float32 either way, as in the trainer")
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa, eager, ...)")
    ap.add_argument("--prompts", type=int, default=16, help=f"prompts per step (x G={G} rollouts each)")
    ap.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt (no padding)")
    ap.add_argument("--response-len", type=int, default=1024, help="longest response (the padded width T)")
    ap.add_argument("--min-response-len", type=int, default=None,
                    help="response lengths drawn uniformly from [this, --response-len] (default: all full)")
    ap.add_argument("--micro", type=int, default=8, help="rows per micro-batch (forward and forward+backward)")
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="LM-head chunk (model.chunk_tokens)")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="activation checkpointing of the decoder (train mode; turns prompt sharing off)")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (token count taken in the first)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--out", default=None, help="append a JSON line of the results to this file")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "--model tiny --device cpu --prompts 2 --prompt-len 16 --response-len 16 --steps 1")
    a = ap.parse_args()
    if a.smoke:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(model="tiny", device="cpu", prompts=2, prompt_len=16, response_len=16, steps=1)
        a = ap.parse_args()
        if a.out is None:
            a.out = os.path.join(tempfile.mkdtemp(prefix="gpu_step-smoke-"), "gpu_step.jsonl")
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    dev = a.device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit(f"gpu_step: --device {dev} but torch {torch.__version__} sees no CUDA GPU (use --device cpu)")
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    T_min = a.response_len if a.min_response_len is None else a.min_response_len

    model = set_compute_dtype(build_model(a.model, dev, master_dtype(dtype), a.attn, a.prompt_len + a.response_len), dtype)
    if a.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)  # as the trainer: default (foreach) AdamW
    spec = LossSpec()
    batch = synthetic_batch(a.prompts, a.prompt_len, a.response_len, T_min, model.config.vocab_size)
    counter = TokenCounter()
    hook = model.get_decoder().register_forward_pre_hook(counter, with_kwargs=True)

    step(model, opt, batch, a, spec, counter, dev)  # warm-up 1: also counts the tokens
    hook.remove()
    for _ in range(a.warmup - 1):
        step(model, opt, batch, a, spec, counter, dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = [step(model, opt, batch, a, spec, counter, dev) for _ in range(a.steps)]  # [(fwd s, update s)]

    tok_ng, tok_tr = counter.tokens["nograd"], counter.tokens["trained"]
    flop_ng, flop_tr = 2 * params * tok_ng, 6 * params * tok_tr
    tot = [f + u for f, u in times]
    mean, best = sum(tot) / len(tot), min(tot)
    fwd = sum(f for f, _ in times) / len(times)
    upd = sum(u for _, u in times) / len(times)
    tflops = (flop_ng + flop_tr) / mean / 1e12
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    import transformers

    B = len(batch)
    print(f"gpu_step: {a.model} ({params / 1e6:.1f} M params, all counted, tied embedding once), {dtype} compute over {master_dtype(dtype)} parameters, attn={a.attn}, "
          f"grad_ckpt={a.grad_ckpt}, on {name}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"batch: {a.prompts} prompts x G={G} = {B} rows, P={a.prompt_len}, T={a.response_len} "
          f"(responses {T_min}..{a.response_len}: {batch.num_tokens} response tokens), micro={a.micro} rows, "
          f"chunk_tokens={a.chunk_tokens}")
    print(f"tokens per step (real tokens fed to the decoder, by a hook; a shared prompt goes in once per micro-batch): "
          f"no-grad forward {tok_ng}, trained (fwd+bwd) {tok_tr}  [naive B*(P+T) = {B * (a.prompt_len + a.response_len)}]")
    print(f"FLOPs per step: 2*params*{tok_ng} + 6*params*{tok_tr} = {(flop_ng + flop_tr) / 1e12:.4g} TFLOP "
          f"(attention products and recompute not counted; LM head counted on prompt tokens too)")
    print(f"step time over {a.steps} steps: mean {mean:.3f} s, min {best:.3f} s "
          f"(no-grad forward {fwd:.3f} s = {flop_ng / fwd / 1e12:.4g} TFLOP/s, "
          f"optimizer_step {upd:.3f} s = {flop_tr / upd / 1e12:.4g} TFLOP/s)")
    print(f"achieved: {tflops:.4g} TFLOP/s (mean step), {(flop_ng + flop_tr) / best / 1e12:.4g} (best step); "
          f"{tflops / PEAK_TFLOPS:.3g} of {PEAK_TFLOPS:.0f} TFLOP/s (H200 bf16 matmul)")
    print(f"peak GPU memory (max_memory_allocated, timed steps): {f'{peak:.1f} GiB' if peak is not None else 'n/a (cpu)'}")

    if a.out:
        row = dict(bench="gpu_step", model=a.model, params=params, device=name, dtype=str(dtype), attn=a.attn,
                   grad_ckpt=a.grad_ckpt, prompts=a.prompts, G=G, prompt_len=a.prompt_len, response_len=a.response_len,
                   min_response_len=T_min, micro=a.micro, chunk_tokens=a.chunk_tokens, response_tokens=batch.num_tokens,
                   tokens_nograd=tok_ng, tokens_trained=tok_tr, tflop_per_step=(flop_ng + flop_tr) / 1e12,
                   step_s=tot, step_mean_s=mean, step_min_s=best, nograd_fwd_mean_s=fwd, optimizer_step_mean_s=upd,
                   tflops=tflops, frac_of_790=tflops / PEAK_TFLOPS, peak_mem_gib=peak,
                   torch=torch.__version__, transformers=transformers.__version__)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"gpu_step: wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
