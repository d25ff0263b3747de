"""Registered rollout backends (`rollout.backend`).

    hf    transformers generate on the policy module itself: its weights are always
          current, `sync_weights` only records the version (rollout/hf.py)
    vllm  a colocated vLLM engine that gets the trainer's weights after every
          update (rollout/vllm.py; imported only when chosen)
    auto  vllm when it is installed and the model is on CUDA, else hf

A backend is a factory `(model, tokenizer, cfg, policy_version) -> Sampler`.
"""

from __future__ import annotations

from typing import Protocol

from tokencredit.batch import RolloutBatch
from tokencredit.registry import Registry
from tokencredit.rollout.hf import generate_hf


class Sampler(Protocol):
    policy_version: int  # the policy whose weights it samples from

    def generate(self, prompts: list[str], answers: list[str], group_offset: int, policy_version: int | None = None) -> RolloutBatch: ...

    def sync_weights(self, model, policy_version: int) -> None: ...

    def sleep(self) -> None: ...  # free sampling memory while the trainer updates (no-op where there is none)


ROLLOUT_BACKENDS: Registry = Registry("rollout backend")


@ROLLOUT_BACKENDS.register("hf")
class HFSampler:
    """transformers `generate` on the training model (rollout/hf.py)."""

    def __init__(self, model, tokenizer, cfg, policy_version: int = 0):
        self.model, self.tokenizer, self.r = model, tokenizer, cfg.rollout
        self.policy_version = policy_version

    def generate(self, prompts: list[str], answers: list[str], group_offset: int, policy_version: int | None = None) -> RolloutBatch:
        r = self.r
        return generate_hf(self.model, self.tokenizer, prompts, n=r.n, temperature=r.temperature, top_p=r.top_p,
                           max_new_tokens=r.max_new_tokens, gen_batch_size=r.gen_batch_size,
                           group_offset=group_offset, answers=answers, cache=r.hf_cache)

    def sync_weights(self, model, policy_version: int) -> None:
        if model is not self.model:
            raise ValueError("the hf backend samples from the policy module itself; it cannot sync another model")
        self.policy_version = policy_version

    def sleep(self) -> None:
        pass


@ROLLOUT_BACKENDS.register("vllm")
def _vllm(model, tokenizer, cfg, policy_version: int = 0):
    from tokencredit.rollout.vllm import VLLMSampler

    return VLLMSampler(model, tokenizer, cfg, policy_version)


def resolve_backend(name: str, model) -> str:
    """`rollout.backend` with "auto" decided: vllm when installed and the model is on CUDA, else hf."""
    if name != "auto":
        return name
    from tokencredit.rollout.vllm import vllm_available

    on_cuda = next(model.parameters()).device.type == "cuda"
    return "vllm" if on_cuda and vllm_available() else "hf"


def make_sampler(model, tokenizer, cfg, policy_version: int = 0) -> Sampler:
    """The backend named by cfg.rollout.backend, holding `policy_version`'s weights."""
    return ROLLOUT_BACKENDS.get(resolve_backend(cfg.rollout.backend, model))(model, tokenizer, cfg, policy_version)
