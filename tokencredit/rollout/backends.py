"""Registered rollout backends. `hf` samples with transformers' generate from the
policy module itself, so its weights are always current and `sync_weights`
only records the version. Another engine (vLLM) registers a factory here."""

from __future__ import annotations

from typing import Protocol

from tokencredit.batch import RolloutBatch
from tokencredit.registry import Registry
from tokencredit.rollout.hf import generate_hf


class Sampler(Protocol):
    def generate(self, prompts: list[str], answers: list[str], group_offset: int) -> RolloutBatch: ...

    def sync_weights(self, model, policy_version: int) -> None: ...


ROLLOUT_BACKENDS: Registry = Registry("rollout backend")


@ROLLOUT_BACKENDS.register("hf")
class HFSampler:
    """transformers `generate` on the training model (rollout/hf.py)."""

    def __init__(self, model, tokenizer, cfg):
        self.model, self.tokenizer, self.r = model, tokenizer, cfg.rollout
        self.policy_version = 0

    def generate(self, prompts: list[str], answers: list[str], group_offset: int) -> RolloutBatch:
        r = self.r
        return generate_hf(self.model, self.tokenizer, prompts, n=r.n, temperature=r.temperature, top_p=r.top_p,
                           max_new_tokens=r.max_new_tokens, gen_batch_size=r.gen_batch_size,
                           group_offset=group_offset, answers=answers)

    def sync_weights(self, model, policy_version: int) -> None:
        if model is not self.model:
            raise ValueError("the hf backend samples from the policy module itself; it cannot sync another model")
        self.policy_version = policy_version


def make_sampler(model, tokenizer, cfg) -> Sampler:
    """The backend named by cfg.rollout.backend."""
    return ROLLOUT_BACKENDS.get(cfg.rollout.backend)(model, tokenizer, cfg)
