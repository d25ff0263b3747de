"""The prompt set of a run: `cfg.data` (or `cfg.eval`) -> rendered prompts,
answers, questions and extra columns, and the seeded prompt stream.

The trainer, the probes and the value probe all build it here, so a probe sees
exactly the prompts the trainer saw: same data, same length filter, same
per-epoch shuffled order.

    position j of the stream -> epoch, pos = divmod(j, len(set))
                             -> randperm(len(set), seed * 1_000_003 + epoch)[pos]
                                (or pos with data.shuffle=false)

Try it:
    ps = build_prompt_set(cfg, tokenizer)          # training prompts
    idx = ps.indices(start=0, count=4)             # the first rollout step's prompts
    ps.prompts[idx[0]], ps.answers[idx[0]]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from tokencredit.data.arithmetic import arithmetic_problems
from tokencredit.data.files import load_problems
from tokencredit.data.prompts import render_prompt

log = logging.getLogger("tokencredit")

EVAL_SEED_OFFSET = 10_007  # held-out arithmetic problems: train.seed + this


@dataclass
class PromptSet:
    prompts: list[str]  # rendered (chat template applied)
    answers: list[str]
    questions: list[str]  # as in the data (no chat markup): what reward functions get as `prompts`
    extras: list[dict[str, Any]]  # the other columns of each problem
    seed: int = 0
    shuffle: bool = True
    _order: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)

    def indices(self, start: int, count: int) -> list[int]:
        """Prompts number start .. start+count-1 of the (seeded, per-epoch shuffled)
        stream: a pure function of (seed, position), so a resumed run (its cursor is
        checkpointed) sees exactly the prompts an uninterrupted one would."""
        n = len(self.prompts)
        out = []
        for j in range(start, start + count):
            epoch, pos = divmod(j, n)
            out.append(self._epoch_order(epoch)[pos] if self.shuffle else pos)
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._order[epoch]


def render_problems(problems, tokenizer, system_prompt: str | None, max_prompt_tokens: int, seed: int = 0, shuffle: bool = True) -> PromptSet:
    """The problems whose rendered prompt fits `max_prompt_tokens` tokens (the rest
    are skipped with one warning)."""
    prompts, answers, questions, extras, skipped = [], [], [], [], 0
    for p in problems:
        text = render_prompt(tokenizer, p.prompt, system_prompt)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            skipped += 1
            continue
        prompts.append(text)
        answers.append(p.answer)
        questions.append(p.prompt)
        extras.append(p.extra)
    if skipped:
        log.warning("skipped %d prompts longer than data.max_prompt_tokens=%d", skipped, max_prompt_tokens)
    return PromptSet(prompts, answers, questions, extras, seed=seed, shuffle=shuffle)


def build_prompt_set(cfg, tokenizer, split: str = "train") -> PromptSet:
    """split "train": cfg.data.train (error when no prompt fits); "eval": the
    held-out set of cfg.eval (empty when eval.num_problems is 0)."""
    d = cfg.data
    if split == "train":
        if d.train == "arithmetic":
            problems = arithmetic_problems(d.num_train, seed=cfg.train.seed, difficulty=d.difficulty)
        else:
            problems = load_problems(d.train, prompt_field=d.prompt_field, answer_field=d.answer_field)
        ps = render_problems(problems, tokenizer, d.system_prompt, d.max_prompt_tokens, seed=cfg.train.seed, shuffle=d.shuffle)
        if not ps.prompts:
            raise ValueError(f"no training prompt fits data.max_prompt_tokens={d.max_prompt_tokens}")
        return ps
    if split != "eval":
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    ev = cfg.eval
    if ev.num_problems <= 0:
        return PromptSet([], [], [], [], seed=cfg.train.seed, shuffle=False)
    if ev.data == "arithmetic":
        # a different seed than training: held-out problems
        problems = arithmetic_problems(ev.num_problems, seed=cfg.train.seed + EVAL_SEED_OFFSET, difficulty=d.difficulty)
    else:
        problems = load_problems(ev.data, prompt_field=d.prompt_field, answer_field=d.answer_field, limit=ev.num_problems)
    return render_problems(problems, tokenizer, d.system_prompt, d.max_prompt_tokens, seed=cfg.train.seed, shuffle=False)
