"""Rollout: backends that sample responses (registered by name in
`ROLLOUT_BACKENDS`, chosen by `rollout.backend`) and the rollout step that the
trainer and the probes share (`rollout_step` in step.py).

A backend is a factory `make(model, tokenizer, cfg) -> Sampler`; a Sampler has
    generate(prompts, answers, group_offset) -> RolloutBatch   (n rows per prompt, groups adjacent)
    sync_weights(model, policy_version) -> None               (after every update; no-op when it samples from `model` itself)
"""

from tokencredit.rollout.backends import ROLLOUT_BACKENDS, HFSampler, Sampler, make_sampler
from tokencredit.rollout.step import RolloutOutput, rollout_step, score

__all__ = ["ROLLOUT_BACKENDS", "HFSampler", "RolloutOutput", "Sampler", "make_sampler", "rollout_step", "score"]
