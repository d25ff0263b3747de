"""One rollout step, shared by the trainer and the probes (no Trainer needed):

    prompt stream[cursor:] --sampler--> RolloutBatch --verifier--> reward
        --group_advantages--> advantage --training_advantages--> advantage that trains
        [--dynamic sampling: repeat until prompts_per_step groups have signal]

Rows carry `policy_version` (the sampling policy) and `prompt_index` (the prompt's
index in the prompt set), so any later reader can find a row's prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokencredit.algo.advantages import group_advantages
from tokencredit.algo.token_weights import training_advantages
from tokencredit.batch import RolloutBatch
from tokencredit.batching import groups_with_signal
from tokencredit.data.promptset import PromptSet
from tokencredit.rewards.functions import merge_stats
from tokencredit.timing import Stopwatch, add_seconds, phase_metrics


@dataclass
class RolloutOutput:
    batch: RolloutBatch  # the rows that go on (after dynamic sampling)
    metrics: dict[str, float]
    cursor: int  # prompt-stream position after this step
    tokens: int  # response tokens generated (every round)
    surplus_groups: int  # dynamic sampling: useful groups sampled beyond the batch, discarded


def score(batch: RolloutBatch, idx: list[int], prompts: PromptSet, verifier, cfg, policy_version: int) -> dict[str, float]:
    """Reward, group advantage and training advantage of a freshly sampled batch
    whose groups are the prompts `idx` (n rows each); returns the reward stats."""
    n = cfg.rollout.n
    of_row = [i for i in idx for _ in range(n)]  # prompt of each row (groups adjacent)
    cols = sorted({c for i in idx for c in prompts.extras[i]})
    rewards, rstats = verifier(batch.response_text, batch.answer, [prompts.questions[i] for i in of_row],
                               {c: [prompts.extras[i].get(c) for i in of_row] for c in cols})
    batch.reward = torch.tensor(rewards, dtype=torch.float32)  # [B]
    adv = group_advantages(batch.reward, batch.group_id, cfg.algo.adv_estimator, cfg.algo.adv_eps)  # [B]
    # sample-polarity methods decide which rows train: the buffer and dynamic sampling see that advantage
    batch.advantage = training_advantages(cfg.token_weights.method, adv, batch.reward, cfg.token_weights.lam,
                                          threshold=cfg.reward.correct_threshold)
    batch.policy_version = torch.full((len(batch),), policy_version, dtype=torch.long)
    batch.prompt_index = torch.tensor(idx, dtype=torch.long).repeat_interleave(n)
    return rstats


def groups_all_equal(batch: RolloutBatch) -> float:
    """Fraction of groups whose rewards are all equal."""
    gids = batch.group_id.unique()
    eq = [float(batch.reward[batch.group_id == g].unique().numel() == 1) for g in gids]
    return sum(eq) / max(len(eq), 1)


def rollout_step(sampler, prompts: PromptSet, verifier, cfg, *, cursor: int, policy_version: int) -> RolloutOutput:
    """prompts_per_step prompts x n responses from position `cursor` of the prompt
    stream, or, with rollout.dynamic_sampling, as many rounds (<= max_gen_rounds)
    as it takes to collect prompts_per_step groups with a nonzero training
    advantage. Group ids are the prompts' stream positions."""
    r = cfg.rollout
    k = r.prompts_per_step
    rounds, t_gen, t_rew, parts, rparts, useful = 0, (0.0, 0.0), (0.0, 0.0), [], [], 0
    while True:
        idx = prompts.indices(cursor, k)
        sw = Stopwatch()
        batch = sampler.generate([prompts.prompts[i] for i in idx], [prompts.answers[i] for i in idx], group_offset=cursor,
                                 policy_version=policy_version)
        g = sw.lap()
        rst = score(batch, idx, prompts, verifier, cfg, policy_version)
        rw = sw.lap()
        cursor += len(idx)
        rounds, t_gen, t_rew = rounds + 1, add_seconds(t_gen, g), add_seconds(t_rew, rw)
        parts.append(batch)
        rparts.append((len(batch), rst))
        if not r.dynamic_sampling:
            break
        useful += int(groups_with_signal(batch.group_id, batch.advantage).sum()) // r.n
        if useful >= k or rounds >= r.max_gen_rounds:
            break
    sampled = parts[0] if len(parts) == 1 else RolloutBatch.concat(parts)
    ntok = sampled.num_tokens
    m = {
        "reward_mean": float(sampled.reward.mean()),
        "response_len_mean": ntok / len(sampled),
        "finished_frac": sum(sampled.finished) / len(sampled),
        "groups_all_equal": float(groups_all_equal(sampled)),
        **phase_metrics("generate", t_gen),
        **phase_metrics("reward", t_rew),
        "gen_tokens": float(ntok),  # response tokens sampled this step (EOS included), every round
        "gen_tokens_per_s": ntok / max(t_gen[0], 1e-9),
        **merge_stats(rparts),  # reward/<name>/mean over every sampled row, reward/<name>/failures
    }
    if not r.dynamic_sampling:
        return RolloutOutput(sampled, m, cursor, ntok, 0)
    keep = groups_with_signal(sampled.group_id, sampled.advantage)  # [B] rows of useful groups
    gids = sampled.group_id[keep].unique_consecutive().tolist()  # useful groups in sampling order
    surplus = max(0, len(gids) - k)
    m.update({
        "ds_gen_rounds": float(rounds),
        "ds_useful_groups": float(len(gids)),
        "ds_dropped_groups": float(len(sampled) // r.n - len(gids)),
        "ds_surplus_groups": float(surplus),
        "ds_short_groups": float(max(0, k - len(gids))),
    })
    rows = torch.isin(sampled.group_id, torch.tensor(gids[:k], dtype=torch.long)).nonzero().squeeze(1)  # [R]
    return RolloutOutput(sampled.select(rows), m, cursor, ntok, surplus)
