"""The training loop. It wires pure pieces together and holds no math of its own.

One rollout step, top to bottom (DESIGN.md "a chain of transforms"):
    prompts --generate_hf--> RolloutBatch --reward.functions--> reward
            --group_advantages--> advantage --RewardBalancedBuffer?--> update set
            --forward_tokens (no grad)--> old_logprob, entropy, hidden
            --token weights--> token_weight --planner--> mini-batches
            --policy_loss + AdamW--> new policy --flip probe?--> metrics row

Deliberate simplifications: single process; the model stays in eval mode (no
dropout) so every forward is deterministic; the reference model for KL is a frozen
copy kept only when `algo.kl_coef > 0`; token-weight quantiles use the entropies
of the policy at the start of the update (not after earlier mini-batch steps).

Run directory: config.yaml, metrics.jsonl (one JSON object per rollout step),
checkpoints/step_N/ (safetensors + optimizer + RNG + buffer), probes/, and at
the end summary.json and final/ (a Hugging Face model directory, tokencredit/export.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokencredit.algo.advantages import group_advantages
from tokencredit.algo.losses import aggregate, denominator, kl_penalty, loss_mask, masked_mean, policy_loss
from tokencredit.batch import RolloutBatch
from tokencredit.algo.token_weights import SAMPLE_POLARITY_METHODS, training_advantages
from tokencredit.batching import PLANNERS, RewardBalancedBuffer, advantage_sign, groups_with_signal, minibatch_metrics
from tokencredit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tokencredit.config import Config, ConfigError, dump_config
from tokencredit.probes.flip import flip_records, flip_stats
from tokencredit.rewards.functions import merge_stats
from tokencredit.rollout.hf import generate_hf
from tokencredit.tracking import Tracker, open_trackers, require_extras

log = logging.getLogger("tokencredit")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_buffer(cfg: Config) -> RewardBalancedBuffer | None:
    """The run's reward-balanced buffer (None when batching.reward_balance.tau is null).
    Units are whole groups under query-preserved batching and for ResRL (whose
    subspaces are per group); single rows otherwise."""
    rb = cfg.batching.reward_balance
    if rb.tau is None:
        return None
    return RewardBalancedBuffer(
        tau=rb.tau, update_rows=rb.update_rows or cfg.rollout.prompts_per_step * cfg.rollout.n, max_age=rb.max_age,
        keep_groups=cfg.batching.planner == "query_preserved" or cfg.token_weights.method == "resrl",
        warn_after=rb.warn_after,
    )


def rows_per_minibatch(cfg: Config) -> int:
    """Rows per optimizer step: train.mini_batch_size prompts x rollout.n responses."""
    return cfg.train.mini_batch_size * cfg.rollout.n


@dataclass
class EvalResult:
    accuracy: float  # avg@k
    mean_len: float
    n: int
    pass_at_k: float = float("nan")
    k: int = 1


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: bool = False, model=None, tokenizer=None):
        from tokencredit.data import arithmetic_problems, load_problems, render_prompt
        from tokencredit.model import load_model
        from tokencredit.rewards.functions import RewardFunctions

        self.cfg = cfg
        # a missing tracker extra fails here, before the model loads (tokencredit/tracking.py)
        require_extras(cfg.output.report_to)
        self.trackers: list[Tracker] = []  # opened when train() starts, closed when it ends
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        # reward.functions load in their worker processes before the model: a bad spec fails in seconds
        rc = cfg.reward
        self.verifier = RewardFunctions(rc.functions, rc.weights, rc.timeout_s)
        try:
            self.verifier.start()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.device = resolve_device(cfg.model.device)
        if model is None:
            model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, device=str(self.device))
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.model.eval()
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)

        # ---- data: rendered prompts + answers, filtered by length
        if cfg.data.train == "arithmetic":
            problems = arithmetic_problems(cfg.data.num_train, seed=cfg.train.seed, difficulty=cfg.data.difficulty)
        else:
            problems = load_problems(cfg.data.train, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field)
        kept: list = []  # the Problems behind self.prompts: questions and extra columns for reward functions
        self.prompts, self.answers = self._render(problems, render_prompt, kept)
        self.questions, self.extras = [p.prompt for p in kept], [p.extra for p in kept]
        if not self.prompts:
            raise ValueError(f"no training prompt fits data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
        self.eval_prompts: list[str] = []
        self.eval_answers: list[str] = []
        self.eval_questions: list[str] = []
        self.eval_extras: list[dict] = []
        if cfg.eval.num_problems > 0:
            if cfg.eval.data == "arithmetic":
                # a different seed than training: held-out problems
                ev = arithmetic_problems(cfg.eval.num_problems, seed=cfg.train.seed + 10_007, difficulty=cfg.data.difficulty)
            else:
                ev = load_problems(cfg.eval.data, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field, limit=cfg.eval.num_problems)
            kept = []
            self.eval_prompts, self.eval_answers = self._render(ev, render_prompt, kept)
            self.eval_questions, self.eval_extras = [p.prompt for p in kept], [p.extra for p in kept]

        self.planner = PLANNERS.get(cfg.batching.planner)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
        )
        warm = cfg.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        self.buffer = build_buffer(cfg)
        if cfg.rollout.n == 1 and cfg.algo.adv_estimator in ("grpo", "drgrpo", "rloo") and cfg.token_weights.method not in SAMPLE_POLARITY_METHODS:
            warnings.warn(
                f"rollout.n=1 with algo.adv_estimator={cfg.algo.adv_estimator}: a group of one response has advantage 0, "
                "so nothing will train; set rollout.n >= 2", RuntimeWarning, stacklevel=2,
            )

        # ---- counters (all restored on resume)
        self.rollout_step = 0  # rollout steps done
        self.prompt_cursor = 0  # training prompts consumed (data pointer; dynamic sampling takes extra rounds)
        self.ds_surplus_total = 0  # dynamic sampling: useful groups sampled beyond the batch and discarded
        self.policy_version = 0  # update sets applied
        self.optim_steps = 0
        self.tokens_generated = 0
        self.first_reward: float | None = None
        self.last_reward: float | None = None
        self.eval_history: list[tuple[int, float]] = []

        self.run_dir = Path(run_dir) if run_dir else Path(cfg.output.root) / (cfg.output.run_name or time.strftime("run-%Y%m%d-%H%M%S"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if resume:
            self._resume()
        else:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            (self.run_dir / "metrics.jsonl").write_text("")

    # ----------------------------------------------------------------- data
    def _render(self, problems, render_prompt, kept: list | None = None):
        """(rendered prompts, answers) of the problems that fit data.max_prompt_tokens;
        those problems are appended to `kept` when given."""
        prompts, answers, skipped = [], [], 0
        for p in problems:
            text = render_prompt(self.tokenizer, p.prompt, self.cfg.data.system_prompt)
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) > self.cfg.data.max_prompt_tokens:
                skipped += 1
                continue
            prompts.append(text)
            answers.append(p.answer)
            if kept is not None:
                kept.append(p)
        if skipped:
            log.warning("skipped %d prompts longer than data.max_prompt_tokens=%d", skipped, self.cfg.data.max_prompt_tokens)
        return prompts, answers

    def _prompt_indices(self, step: int) -> list[int]:
        """Prompts of rollout step `step` when every step takes one round of
        prompts_per_step prompts (no dynamic sampling)."""
        k = self.cfg.rollout.prompts_per_step
        return self._prompt_range(step * k, k)

    def _prompt_range(self, start: int, count: int) -> list[int]:
        """Training prompts number start .. start+count-1 of the (seeded, per-epoch
        shuffled) prompt stream: a deterministic function of (seed, position), so a
        resumed run (the cursor is checkpointed) sees exactly the prompts an
        uninterrupted one would."""
        n = len(self.prompts)
        out = []
        for j in range(start, start + count):
            epoch, pos = divmod(j, n)
            out.append(self._epoch_order(epoch)[pos] if self.cfg.data.shuffle else pos)
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        if getattr(self, "_order_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.prompts), generator=g).tolist(), epoch
        return self._order

    # ------------------------------------------------------------- forward
    def _forward_rows(self, batch: RolloutBatch, **kw) -> dict[str, torch.Tensor]:
        """forward_tokens over `batch` in micro-batches of rows, no grad; outputs
        re-padded to the batch's own [B, T]."""
        from tokencredit.model import forward_tokens

        B, T = batch.response_ids.shape
        mb = self.cfg.train.micro_batch_size
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for s in range(0, B, mb):
                sub = batch.select(range(s, min(B, s + mb))).to(self.device)
                out = forward_tokens(self.model, sub, temperature=self._temp, chunk_tokens=self.cfg.model.chunk_tokens, **kw)
                for k, v in out.items():
                    pad = torch.zeros((v.shape[0], T) + tuple(v.shape[2:]), dtype=v.dtype)
                    pad[:, : v.shape[1]] = v.cpu()
                    parts.setdefault(k, []).append(pad)
        return {k: torch.cat(v, 0) for k, v in parts.items()}

    @property
    def _temp(self) -> float:
        return self.cfg.rollout.temperature if self.cfg.rollout.temperature > 0 else 1.0

    # ------------------------------------------------------------- rollout
    def _sample(self, idx: list[int]) -> tuple[RolloutBatch, float, float, dict[str, float]]:
        """Generate n responses for prompts `idx`, score them, and attach the group
        advantages and the advantages that train. Returns (batch, gen_s, reward_s,
        reward stats: reward/<name>/mean and /failures per reward function)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = generate_hf(
            self.model, self.tokenizer, [self.prompts[i] for i in idx], n=cfg.rollout.n,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
            gen_batch_size=cfg.rollout.gen_batch_size, group_offset=self.prompt_cursor,
            answers=[self.answers[i] for i in idx],
        )
        t1 = time.perf_counter()
        of_row = [i for i in idx for _ in range(cfg.rollout.n)]  # prompt of each row (groups adjacent)
        cols = sorted({c for i in idx for c in self.extras[i]})
        rewards, rstats = self.verifier(batch.response_text, batch.answer, [self.questions[i] for i in of_row],
                                        {c: [self.extras[i].get(c) for i in of_row] for c in cols})
        batch.reward = torch.tensor(rewards, dtype=torch.float32)
        t2 = time.perf_counter()
        adv = group_advantages(batch.reward, batch.group_id, cfg.algo.adv_estimator, cfg.algo.adv_eps)
        # sample-polarity methods decide which rows train: the buffer and dynamic sampling see that advantage
        batch.advantage = training_advantages(cfg.token_weights.method, adv, batch.reward, cfg.token_weights.lam,
                                              threshold=cfg.reward.correct_threshold)
        batch.policy_version = torch.full((len(batch),), self.policy_version, dtype=torch.long)
        batch.prompt_index = torch.tensor(idx, dtype=torch.long).repeat_interleave(cfg.rollout.n)
        self.prompt_cursor += len(idx)
        return batch, t1 - t0, t2 - t1, rstats

    def rollout(self) -> tuple[RolloutBatch, dict[str, float]]:
        """One rollout step: prompts_per_step prompts x n responses, or, with
        rollout.dynamic_sampling, as many rounds (<= max_gen_rounds) as it takes to
        collect prompts_per_step groups with a nonzero training advantage."""
        cfg = self.cfg
        k = cfg.rollout.prompts_per_step
        rounds, t_gen, t_rew, parts, rparts = 0, 0.0, 0.0, [], []
        useful = 0
        while True:
            batch, tg, tr, rst = self._sample(self._prompt_range(self.prompt_cursor, k))
            rounds, t_gen, t_rew = rounds + 1, t_gen + tg, t_rew + tr
            parts.append(batch)
            rparts.append((len(batch), rst))
            if not cfg.rollout.dynamic_sampling:
                break
            useful += int(groups_with_signal(batch.group_id, batch.advantage).sum()) // cfg.rollout.n
            if useful >= k or rounds >= cfg.rollout.max_gen_rounds:
                break
        sampled = parts[0] if len(parts) == 1 else RolloutBatch.concat(parts)
        ntok = sampled.num_tokens
        self.tokens_generated += ntok
        m = {
            "reward_mean": float(sampled.reward.mean()),
            "response_len_mean": ntok / len(sampled),
            "finished_frac": sum(sampled.finished) / len(sampled),
            "groups_all_equal": float(self._groups_all_equal(sampled)),
            "time_generate_s": t_gen,
            "time_reward_s": t_rew,
            "gen_tokens_per_s": ntok / max(t_gen, 1e-9),
            **merge_stats(rparts),  # reward/<name>/mean over every sampled row, reward/<name>/failures
        }
        if not cfg.rollout.dynamic_sampling:
            return sampled, m
        keep = groups_with_signal(sampled.group_id, sampled.advantage)  # [B] rows of useful groups
        gids = sampled.group_id[keep].unique_consecutive().tolist()  # useful groups in sampling order
        kept_groups = torch.tensor(gids[:k], dtype=torch.long)
        self.ds_surplus_total += max(0, len(gids) - k)
        m.update({
            "ds_gen_rounds": float(rounds),
            "ds_useful_groups": float(len(gids)),
            "ds_dropped_groups": float(len(sampled) // cfg.rollout.n - len(gids)),
            "ds_surplus_groups": float(max(0, len(gids) - k)),
            "ds_surplus_groups_total": float(self.ds_surplus_total),
            "ds_short_groups": float(max(0, k - len(gids))),
        })
        rows = torch.isin(sampled.group_id, kept_groups).nonzero().squeeze(1)
        return sampled.select(rows), m

    @staticmethod
    def _groups_all_equal(batch: RolloutBatch) -> float:
        gids = batch.group_id.unique()
        eq = [float(batch.reward[batch.group_id == g].unique().numel() == 1) for g in gids]
        return sum(eq) / max(len(eq), 1)

    # -------------------------------------------------------------- update
    def _token_weights(self, batch: RolloutBatch, gen: torch.Generator):
        """(token_weight [B, T] | None, advantages [B], stats) for the rows of `batch`."""
        tw = self.cfg.token_weights
        if tw.method == "none":
            return None, batch.advantage, {}
        from tokencredit.algo.token_weights import compute_token_weights

        params = {
            "forking": {"top": tw.top},
            "forking_random": {"top": tw.top},
            "forking_low": {"bottom": 1.0 - tw.top},
            "entropy_band": {"lo": tw.band[0], "hi": tw.band[1]},
            "w_reinforce": {"lam": tw.lam},
            "resrl": {"rank": tw.resrl_rank, "max_pos_tokens": tw.resrl_max_pos_tokens, "pos_scale": tw.resrl_pos_scale},
        }.get(tw.method, {})
        if tw.method in SAMPLE_POLARITY_METHODS or tw.method == "resrl":
            params["threshold"] = self.cfg.reward.correct_threshold  # reward >= threshold: a correct row
        return compute_token_weights(
            tw.method, entropy=batch.entropy, mask=batch.response_mask, advantages=batch.advantage,
            rewards=batch.reward, group_id=batch.group_id, hidden=batch.hidden,
            is_positive=batch.advantage > 0, generator=gen, **params,
        )

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        cfg = self.cfg
        tw_cfg = cfg.token_weights
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + self.policy_version)
        pf = cfg.probes.flip
        probe = pf.every > 0 and (self.policy_version + 1) % pf.every == 0
        t0 = time.perf_counter()
        # the flip probe's reference: the same forward, padding and row composition as its "after"
        l_before = self._forward_rows(batch, with_entropy=False)["logprob"] if probe else None
        t_probe = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._pre_update_forward(batch, need_hidden=tw_cfg.method == "resrl")
        t_fwd = time.perf_counter() - t0

        stats: dict[str, list[float]] = {}
        tw_time = 0.0
        # ResRL's subspaces are per whole group: always built over the whole update set
        whole_set = tw_cfg.scope == "rollout-batch" or tw_cfg.method == "resrl"
        if whole_set:
            t = time.perf_counter()
            batch.token_weight, batch.advantage, st = self._token_weights(batch, gen)
            tw_time += time.perf_counter() - t
            _acc(stats, st)
        rows_per_mb = rows_per_minibatch(cfg)
        count_zero = tw_cfg.denominator == "all"
        t_upd = time.perf_counter()
        mb_metrics = {}
        for epoch in range(cfg.train.ppo_epochs):
            plan = self.planner(batch.group_id, batch.advantage, batch.response_lengths, rows_per_mb, gen)
            if epoch == 0:
                mb_metrics = minibatch_metrics(batch.group_id, batch.advantage, plan)
            for rows in plan:
                mbatch = batch.select(rows)
                micro_rows = [list(range(s, min(len(mbatch), s + cfg.train.micro_batch_size))) for s in range(0, len(mbatch), cfg.train.micro_batch_size)]
                if tw_cfg.scope == "mini-batch" and not whole_set:
                    t = time.perf_counter()
                    mbatch.token_weight, mbatch.advantage, st = self._token_weights(mbatch, gen)
                    tw_time += time.perf_counter() - t
                    _acc(stats, st)
                micros = [mbatch.select(r) for r in micro_rows]
                if tw_cfg.scope == "micro-batch" and not whole_set:
                    t = time.perf_counter()
                    for u in micros:
                        u.token_weight, u.advantage, st = self._token_weights(u, gen)
                        _acc(stats, st)
                    tw_time += time.perf_counter() - t
                # one normaliser for the whole mini-batch (gradient-accumulation invariant)
                denom = sum(denominator(loss_mask(u.response_mask, u.token_weight, count_zero), cfg.algo.loss_agg) for u in micros)
                self.optimizer.zero_grad(set_to_none=True)
                self.model.train(cfg.model.gradient_checkpointing)  # HF checkpoints activations only in train mode
                for u in micros:
                    _acc(stats, self._micro_step(u, denom, count_zero))
                self.model.eval()
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
                _acc(stats, {"grad_norm": float(gnorm)})
                self.optimizer.step()
                self.scheduler.step()
                self.optim_steps += 1
        t_upd = time.perf_counter() - t_upd
        self.policy_version += 1
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out.update(mb_metrics)
        valid = batch.response_mask.bool()
        out.update({
            "entropy_mean": float(batch.entropy[valid].mean()) if valid.any() else 0.0,
            "update_rows": float(len(batch)),
            "update_pos_rows": float((batch.advantage > 0).sum()),
            "update_neg_rows": float((batch.advantage < 0).sum()),
            "time_old_logprob_s": t_fwd,
            "time_update_s": t_upd,
            "time_token_weights_s": tw_time,
            "lr": self.scheduler.get_last_lr()[0],
        })
        if probe:
            t = time.perf_counter()
            after = self._forward_rows(batch, with_entropy=False)["logprob"]
            delta = after - l_before
            out.update(flip_stats(delta, batch.advantage, batch.response_mask, pf.eps))
            if pf.save_tokens:
                self._save_flip_records(delta, batch, l_before)
            out["time_flip_probe_s"] = t_probe + time.perf_counter() - t
        return out

    def _forward_subset(self, batch: RolloutBatch, rows, base: dict, need_hidden: bool) -> dict[str, torch.Tensor]:
        """No-grad forward of `rows` of `batch`; {"logprob", "entropy"[, "hidden"]} as
        full [B, T] ([B, T, H]) tensors: the forwarded rows' values written into a copy
        of base[key] (zeros where base has no tensor for the key)."""
        B, T = batch.response_ids.shape
        cur = self._forward_rows(batch.select(rows), with_entropy=True, with_hidden=need_hidden)
        t = cur["logprob"].shape[1]
        out = {}
        for key, v in cur.items():
            full = base[key].clone() if base.get(key) is not None else torch.zeros((B, T) + tuple(v.shape[2:]))
            full[rows, :t] = v
            out[key] = full
        return out

    def _pre_update_forward(self, batch: RolloutBatch, need_hidden: bool) -> None:
        """Fill batch.old_logprob / entropy / hidden for the update.

        Rows sampled by the current policy that already carry log-probs and
        entropies from rollout time (the reward-balanced buffer computes them)
        are not forwarded again; stale rows keep their sampling-time old_logprob
        for the importance ratio but get current entropies (and hidden states).
        """
        B = len(batch)
        if (need_hidden and batch.hidden is None) or batch.old_logprob is None or batch.entropy is None or batch.policy_version is None:
            redo = list(range(B))
        else:
            redo = (batch.policy_version != self.policy_version).nonzero().flatten().tolist()
        if not redo:
            return
        cur = self._forward_subset(batch, redo, {"entropy": batch.entropy, "hidden": batch.hidden}, need_hidden)
        batch.entropy = cur["entropy"]
        if need_hidden:
            batch.hidden = cur["hidden"]
        if batch.old_logprob is None:  # then every row was forwarded
            batch.old_logprob = cur["logprob"]

    def _sampling_forward(self, batch: RolloutBatch) -> None:
        """Log-probs (the importance ratio's old policy), entropies and, for ResRL,
        hidden states of the sampling policy, for rows about to be buffered. Rows
        with zero training advantage are dropped by the buffer, so they are not
        forwarded (their fields stay 0)."""
        B, T = batch.response_ids.shape
        rows = advantage_sign(batch.advantage).ne(0).nonzero().squeeze(1)  # [R]
        if len(rows) == 0:
            batch.old_logprob, batch.entropy, batch.hidden = torch.zeros(B, T), torch.zeros(B, T), None
            return
        cur = self._forward_subset(batch, rows, {}, need_hidden=self.cfg.token_weights.method == "resrl")
        batch.old_logprob, batch.entropy, batch.hidden = cur["logprob"], cur["entropy"], cur.get("hidden")

    def _micro_step(self, u: RolloutBatch, denom: float, count_zero: bool) -> dict[str, float]:
        from tokencredit.model import forward_tokens

        cfg = self.cfg
        u = u.to(self.device)
        out = forward_tokens(self.model, u, temperature=self._temp, chunk_tokens=cfg.model.chunk_tokens, with_entropy=False)
        loss, st = policy_loss(
            out["logprob"], u.old_logprob, u.advantage, u.response_mask,
            clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, dual_clip=cfg.algo.dual_clip,
            agg=cfg.algo.loss_agg, token_weight=u.token_weight, count_zero_weight=count_zero, denom=denom,
        )
        st["pg_loss"] = float(loss.detach())
        if self.ref_model is not None:
            ref = self._ref_forward(u)
            kl = kl_penalty(out["logprob"], ref.to(self.device), cfg.algo.kl_estimator)
            lm = loss_mask(u.response_mask, u.token_weight, count_zero)
            loss = loss + cfg.algo.kl_coef * aggregate(kl, lm, cfg.algo.loss_agg, denom)
            st["kl"] = float(masked_mean(kl.detach(), u.response_mask))
        loss.backward()
        return st

    @torch.no_grad()
    def _ref_forward(self, batch: RolloutBatch) -> torch.Tensor:
        from tokencredit.model import forward_tokens

        return forward_tokens(self.ref_model, batch.to(self.device), temperature=self._temp, chunk_tokens=self.cfg.model.chunk_tokens, with_entropy=False)["logprob"].cpu()

    def _save_flip_records(self, delta, batch, l_before):
        import pyarrow as pa
        import pyarrow.parquet as pq

        d = self.run_dir / "probes"
        d.mkdir(exist_ok=True)
        rec = flip_records(delta, batch.advantage, batch.response_mask, batch.response_ids, batch.entropy, l_before, self.policy_version,
                           group_id=batch.group_id, prompt_index=batch.prompt_index)
        tmp = d / f".flip_step_{self.rollout_step}.parquet.tmp"
        pq.write_table(pa.table(rec), tmp)
        tmp.replace(d / f"flip_step_{self.rollout_step}.parquet")

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> EvalResult:
        """Held-out accuracy; RNG-isolated so it never changes the training trajectory."""
        from tokencredit.evaluate import evaluate_prompts

        ev = self.cfg.eval
        if not self.eval_prompts:
            return EvalResult(float("nan"), 0.0, 0)
        k = ev.k or ev.n
        _, s = evaluate_prompts(
            self.model, self.tokenizer, self.eval_prompts, self.eval_answers, n=ev.n, k=k,
            temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
            gen_batch_size=self.cfg.rollout.gen_batch_size, progress=False, seed=self.cfg.train.seed + 1,
            verifier=self.verifier, name="eval", questions=self.eval_questions, extras=self.eval_extras,
            threshold=self.cfg.reward.correct_threshold,
        )
        return EvalResult(s[f"avg@{k}"], s["response_len_mean"], s["num_problems"] * ev.n, s[f"pass@{k}"], k)

    # ---------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        total = cfg.train.steps
        self.trackers = open_trackers(cfg, self.run_dir, resume_step=self.rollout_step)
        if self.rollout_step == 0 and self.eval_prompts:
            e = self.evaluate()
            self.eval_history.append((0, e.accuracy))
            self._log({"step": 0, **_eval_row(e)})
        bar = tqdm(total=total, initial=self.rollout_step, desc="train", disable=not cfg.output.progress, dynamic_ncols=True)
        t_start = time.perf_counter()
        tokens_at_start = self.tokens_generated
        while self.rollout_step < total:
            t0 = time.perf_counter()
            batch, m = self.rollout()
            self.rollout_step += 1
            if self.first_reward is None:
                self.first_reward = m["reward_mean"]
            self.last_reward = m["reward_mean"]
            update_set = batch
            if self.buffer is not None:
                # sampling-time policy: old_logprob kept for the ratio; entropy (and ResRL's hidden
                # states) serve the update directly while the row is fresh
                self._sampling_forward(batch)
                self.buffer.add(batch, self.policy_version)
                update_set, bst = self.buffer.pop_update_set(self.policy_version)
                m.update(bst)
            if update_set is not None and len(update_set) > 0:
                m.update(self.update(update_set))
            else:
                m["skipped_update"] = 1.0
            step_time = time.perf_counter() - t0
            m["time_step_s"] = step_time
            if "time_flip_probe_s" in m:
                m["flip_probe_share"] = m["time_flip_probe_s"] / step_time
            m["tokens_per_s"] = (self.tokens_generated - tokens_at_start) / max(time.perf_counter() - t_start, 1e-9)
            if cfg.eval.every > 0 and self.rollout_step % cfg.eval.every == 0 and self.rollout_step < total:
                e = self.evaluate()
                self.eval_history.append((self.rollout_step, e.accuracy))
                m.update(_eval_row(e))
            m["step"] = self.rollout_step
            m["policy_version"] = self.policy_version
            self._log(m)
            bar.set_postfix(reward=f"{m['reward_mean']:.2f}", step_s=f"{step_time:.1f}", tok_s=f"{m['gen_tokens_per_s']:.0f}")
            bar.update(1)
            last = self.rollout_step == total
            if (cfg.output.save_every > 0 and self.rollout_step % cfg.output.save_every == 0) or last:
                self.save()
        bar.close()
        summary = {
            "steps": self.rollout_step,
            "optimizer_steps": self.optim_steps,
            "reward_first_step": self.first_reward,
            "reward_last_step": self.last_reward,
            "tokens_per_s": (self.tokens_generated - tokens_at_start) / max(time.perf_counter() - t_start, 1e-9),
            "wall_s": time.perf_counter() - t_start,
        }
        if self.buffer is not None:
            summary["rb_utilisation"] = self.buffer.utilisation
        if self.eval_prompts:
            e = self.evaluate()
            self.eval_history.append((self.rollout_step, e.accuracy))
            self._log({"step": self.rollout_step, **_eval_row(e), "final": True})
            summary["eval_accuracy_start"] = self.eval_history[0][1]
            summary["eval_accuracy_end"] = e.accuracy
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.output.save_final:  # RUN_DIR/final/: a Hugging Face model directory (tokencredit/export.py)
            from tokencredit.export import export_final

            export_final(self.model, self.tokenizer, self.run_dir, dump_config(cfg), summary)
        for t in self.trackers:
            t.summary(summary)
            t.close()
        self.trackers = []
        return summary

    def _log(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}) + "\n")
        for t in self.trackers:  # output.report_to: every numeric value at the row's rollout step
            t.log(row, int(row.get("step", self.rollout_step)))

    # ---------------------------------------------------------- checkpoints
    def save(self) -> Path:
        state = {
            "rollout_step": self.rollout_step,
            "prompt_cursor": self.prompt_cursor,
            "ds_surplus_total": self.ds_surplus_total,
            "policy_version": self.policy_version,
            "optim_steps": self.optim_steps,
            "tokens_generated": self.tokens_generated,
            "first_reward": self.first_reward,
            "last_reward": self.last_reward,
            "eval_history": self.eval_history,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
                    "python_version": random.getstate()[0]},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return save_checkpoint(self.ckpt_dir, self.rollout_step, self.model, state, keep_last=self.cfg.output.keep_last)

    def _resume(self) -> None:
        ck = latest_checkpoint(self.ckpt_dir)
        if ck is None:
            # killed before its first checkpoint: nothing to restore, start over in the same directory
            msg = f"resume: {self.run_dir} has no complete checkpoint yet; starting it from step 0 with its saved config"
            log.warning(msg)
            print(f"tokencredit: {msg}", flush=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            (self.run_dir / "metrics.jsonl").write_text("")
            return
        st = load_checkpoint(ck, self.model)
        self.rollout_step = st["rollout_step"]
        self.prompt_cursor = st.get("prompt_cursor", self.rollout_step * self.cfg.rollout.prompts_per_step)
        self.ds_surplus_total = st.get("ds_surplus_total", 0)
        self.policy_version = st["policy_version"]
        self.optim_steps = st["optim_steps"]
        self.tokens_generated = st["tokens_generated"]
        self.first_reward, self.last_reward = st["first_reward"], st["last_reward"]
        self.eval_history = [tuple(x) for x in st["eval_history"]]
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        rng = st["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_pos"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.buffer is not None and "buffer" in st:
            self.buffer.load_state_dict(st["buffer"])
        # drop metric rows logged after the checkpoint (the killed run's tail)
        mpath = self.run_dir / "metrics.jsonl"
        if mpath.exists():
            keep = [ln for ln in mpath.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= self.rollout_step
                    and not json.loads(ln).get("final")]
            mpath.write_text("".join(k + "\n" for k in keep))
        log.info("resumed from %s (rollout step %d)", ck, self.rollout_step)


def _eval_row(e: EvalResult) -> dict[str, float]:
    """Metrics of one evaluation: eval_accuracy is avg@k (= accuracy for k = 1)."""
    return {"eval_accuracy": e.accuracy, "eval_pass_at_k": e.pass_at_k, "eval_k": e.k, "eval_len_mean": e.mean_len}


def _acc(stats: dict[str, list[float]], new: dict[str, float]) -> None:
    for k, v in new.items():
        stats.setdefault(k, []).append(float(v))
