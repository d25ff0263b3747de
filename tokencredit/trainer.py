"""The training loop. It wires pure pieces together and holds no math of its own.

One rollout step, top to bottom (DESIGN.md "a chain of transforms"):
    prompts --rollout_step (rollout/step.py)--> RolloutBatch with reward, advantage
            --RewardBalancedBuffer?--> update set
            --forward_rows (no grad)--> old_logprob, entropy, hidden
            --planner--> mini-batches --token weights--> token_weight
            --optimizer_step (update.py)--> new policy --flip probe?--> metrics row

Where each concern lives: prompts data/promptset.py; sampling rollout/
(backend registry, rollout step); math algo/ and batching.py; the optimizer
step update.py; run-directory files rundir.py; this file only wires them.

Deliberate simplifications: data parallelism (torchrun; train.data_parallel auto,
fsdp2 or ddp) gives every rank the whole gathered rollout batch (tokencredit/dist.py); the model stays in eval mode (no
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
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokencredit.algo.importance import sampler_gap, tis_weights
from tokencredit.algo.token_weights import SAMPLE_POLARITY_METHODS, compute_token_weights, method_params
from tokencredit.batch import RolloutBatch
from tokencredit.batching import PLANNERS, RewardBalancedBuffer, advantage_sign, minibatch_metrics
from tokencredit.checkpoint import latest_checkpoint, load_model_weights, load_weights, read_checkpoint, save_checkpoint
from tokencredit.config import Config, ConfigError, dump_config
from tokencredit.data.promptset import build_prompt_set
from tokencredit.dist import (RankSampler, average_gradients, broadcast_object, full_state, gather_object, init_distributed,
                              load_full_state, rank_shares, shard_model, unsharded_copy)
from tokencredit.model.forward import forward_rows
from tokencredit.model.load import resolve_device
from tokencredit.model.precision import HALF, check_compute_dtype, master_dtype, set_compute_dtype
from tokencredit.probes.flip import flip_records, flip_stats
from tokencredit.rollout import make_sampler, rollout_step
from tokencredit.rundir import append_jsonl, read_jsonl, write_jsonl, write_parquet
from tokencredit.timing import Stopwatch, add_seconds, phase_metrics
from tokencredit.tracking import Tracker, open_trackers, require_extras
from tokencredit.update import LossSpec, loss_normaliser, micro_batches, optimizer_step

log = logging.getLogger("tokencredit")


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
        from tokencredit.model import load_model
        from tokencredit.rewards.functions import start_reward_functions

        self.cfg = cfg
        # a missing tracker extra fails here, before the model loads (tokencredit/tracking.py)
        require_extras(cfg.output.report_to)
        self.trackers: list[Tracker] = []  # opened when train() starts, closed when it ends
        self.dist = init_distributed(cfg.train.dist_timeout_s)  # torchrun: data parallel over WORLD_SIZE ranks (tokencredit/dist.py)
        _check_world(cfg, self.dist.world)  # before the model loads
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        self.device = resolve_device(cfg.model.device)
        compute = check_compute_dtype(cfg.model.dtype, self.device)  # one line naming model.dtype, before any load
        torch.manual_seed(cfg.train.seed + 1_000_003 * self.dist.rank)  # rank 0 samples as one process would
        random.seed(cfg.train.seed + 1_000_003 * self.dist.rank)
        # reward.functions load in their worker processes before the model: a bad spec fails in seconds
        self.verifier = start_reward_functions(cfg.reward)
        # auto: FSDP2 on GPU; on CPU (gloo) replicated weights, which measured faster (docs/results/dp_scaling.md)
        self.dp_mode = {"auto": "fsdp2" if self.device.type == "cuda" else "ddp"}.get(cfg.train.data_parallel, cfg.train.data_parallel)
        self.fsdp = self.dist.world > 1 and self.dp_mode == "fsdp2"
        # fp32 master weights (optimizer, checkpoints); forwards in the compute dtype (model/precision.py)
        master = master_dtype(compute)
        if model is None:
            model, tokenizer = load_model(cfg.model.name, dtype=master, device=str(self.device))
        self.model, self.tokenizer = set_compute_dtype(model.to(self.device, master), compute), tokenizer
        self.model.eval()
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if cfg.algo.kl_coef > 0:  # replicated on every rank, also under FSDP2 (no-grad forwards only)
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)
        # the sampler before sharding: a vLLM engine loads the full weights (later syncs gather them)
        self.sampler = make_sampler(self.model, self.tokenizer, cfg)
        if self.dist.world > 1:
            shard_model(self.model, self.dp_mode, param_dtype=compute if self.fsdp and compute in HALF else None)
            self.sampler.sync_weights(self.model, 0)  # a vLLM engine holds rank 0's weights from the start
            self.sampler = RankSampler(self.sampler, self.dist)  # each rank samples its share; rows gathered

        # ---- data: rendered prompts + answers (filtered by length), the held-out set
        self.prompt_set = build_prompt_set(cfg, self.tokenizer, "train")
        self.eval_set = build_prompt_set(cfg, self.tokenizer, "eval")
        self.loss_spec = LossSpec.from_config(cfg)

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

        name = cfg.output.run_name or broadcast_object(time.strftime("run-%Y%m%d-%H%M%S"), self.dist)  # rank 0's clock
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.output.root) / name
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.output.rank_logs and self.dist.world > 1:
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.run_dir / "logs" / f"rank_{self.dist.rank}.log")
            handler.setFormatter(logging.Formatter(f"%(asctime)s rank {self.dist.rank} %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("tokencredit").addHandler(handler)
            log.info("rank %d of %d (%s, %s), run %s", self.dist.rank, self.dist.world, self.dist.backend, self.dp_mode, self.run_dir)
        if resume:
            self._resume()
        elif self.dist.main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            (self.run_dir / "metrics.jsonl").write_text("")

    # ------------------------------------------------------------- rollout
    def rollout(self) -> tuple[RolloutBatch, dict[str, float]]:
        """One rollout step from the prompt cursor (rollout/step.py): the batch
        that goes on and its metrics; advances the cursor and token counters."""
        out = rollout_step(self.sampler, self.prompt_set, self.verifier, self.cfg,
                           cursor=self.prompt_cursor, policy_version=self.policy_version)
        self.prompt_cursor = out.cursor
        self.tokens_generated += out.tokens
        if self.cfg.rollout.dynamic_sampling:
            self.ds_surplus_total += out.surplus_groups
            out.metrics["ds_surplus_groups_total"] = float(self.ds_surplus_total)
        return out.batch, out.metrics

    # ------------------------------------------------------------- forward
    def _forward_rows(self, batch: RolloutBatch, **kw) -> dict[str, torch.Tensor]:
        """The policy's no-grad per-token forward (model/forward.py `forward_rows`) at
        the run's temperature, chunking and micro-batch size; [B, T] CPU tensors."""
        c = self.cfg
        return forward_rows(self.model, batch, micro_rows=c.train.micro_batch_size, temperature=c.rollout.logprob_temperature,
                            chunk_tokens=c.model.chunk_tokens, **kw)

    def _forward_subset(self, batch: RolloutBatch, rows, base: dict, need_hidden: bool) -> dict[str, torch.Tensor]:
        """The one place the policy forward for an update set happens: no-grad forward
        of `rows` of `batch`; {"logprob", "entropy"[, "hidden"]} as full [B, T]
        ([B, T, H]) tensors: the forwarded rows' values written into a copy of
        base[key] (zeros where base has no tensor for the key)."""
        B, T = batch.response_ids.shape
        cur = self._forward_rows(batch.select(rows), with_entropy=True, with_hidden=need_hidden)
        t = cur["logprob"].shape[1]
        out = {}
        for key, v in cur.items():
            full = base[key].clone() if base.get(key) is not None else torch.zeros((B, T) + tuple(v.shape[2:]), dtype=v.dtype)
            full[rows, :t] = v
            out[key] = full
        return out

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

    # -------------------------------------------------------------- update
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One update set -> train.ppo_epochs x (planned mini-batches -> one optimizer step each)."""
        cfg, tw = self.cfg, self.cfg.token_weights
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + self.policy_version)
        stats: dict[str, list[float]] = {}
        sw = Stopwatch()
        self._pre_update_forward(batch, need_hidden=tw.method == "resrl")  # old_logprob, entropy (, hidden)
        t_fwd, t_tw = sw.lap(), (0.0, 0.0)
        gap = self._sampler_correction(batch)  # sampler vs trainer log-probs (+ TIS weights) when the sampler reports them
        self.sampler.sleep()
        # weigh: once over the update set (ResRL's subspaces are per whole group: always), or per cut below
        scope = "rollout-batch" if tw.method == "resrl" else tw.scope
        if scope == "rollout-batch":
            t_tw = add_seconds(t_tw, self._weigh(batch, gen, stats))
        sw, mb_metrics = Stopwatch(), {}
        for epoch in range(cfg.train.ppo_epochs):
            plan = self.planner(batch.group_id, batch.advantage, batch.response_lengths, rows_per_minibatch(cfg), gen)  # plan
            if epoch == 0:
                mb_metrics = minibatch_metrics(batch.group_id, batch.advantage, plan)
            for rows in plan:
                mini = batch.select(rows)
                if scope == "mini-batch":
                    t_tw = add_seconds(t_tw, self._weigh(mini, gen, stats))
                micros = micro_batches(mini, cfg.train.micro_batch_size)
                if scope == "micro-batch":
                    for u in micros:
                        t_tw = add_seconds(t_tw, self._weigh(u, gen, stats))
                micros, dp = self._rank_share(micros)
                st = optimizer_step(  # step: one normaliser for the whole mini-batch
                    self.model, self.optimizer, micros, self.loss_spec, temperature=cfg.rollout.logprob_temperature,
                    chunk_tokens=cfg.model.chunk_tokens, grad_clip=cfg.train.grad_clip, ref_model=self.ref_model,
                    train_mode=cfg.model.gradient_checkpointing, **dp,  # HF checkpoints activations only in train mode
                )
                for k, v in st.items():
                    stats.setdefault(k, []).extend(v)
                self.scheduler.step()
                self.optim_steps += 1
        t_upd = sw.lap()  # the planned optimizer steps (token weights included)
        self.policy_version += 1
        self.sampler.sync_weights(self.model, self.policy_version)
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out.update(mb_metrics)
        out.update(gap)
        valid = batch.response_mask.bool()
        out.update({
            "entropy_mean": float(batch.entropy[valid].mean()) if valid.any() else 0.0,
            "update_rows": float(len(batch)),
            "update_pos_rows": float((batch.advantage > 0).sum()),
            "update_neg_rows": float((batch.advantage < 0).sum()),
            **phase_metrics("old_logprob", t_fwd),
            **phase_metrics("update", t_upd),
            **phase_metrics("token_weights", t_tw),
            "lr": self.scheduler.get_last_lr()[0],
        })
        return out

    def _rank_share(self, micros: list[RolloutBatch]) -> tuple[list[RolloutBatch], dict]:
        """(micro-batches this rank backpropagates, optimizer_step keywords). One
        process: all of them. Data parallel: this rank's whole groups of the
        mini-batch, the global normaliser / world size, gradients averaged over
        ranks (tokencredit/dist.py)."""
        W = self.dist.world
        if W <= 1:
            return micros, {}
        mini = micros[0] if len(micros) == 1 else RolloutBatch.concat(micros)  # keeps micro-scope token weights
        shares = rank_shares(mini.group_id, W, tokens=mini.response_lengths)  # every rank's, token-balanced
        mb = self.cfg.train.micro_batch_size
        mine = micro_batches(mini.select(shares[self.dist.rank]), mb) if len(shares[self.dist.rank]) else []
        kw = {"normaliser": loss_normaliser(micros, self.loss_spec) / W}  # the global count / W (DP averages gradients)
        if not self.fsdp:
            return mine, kw | {"grad_sync": average_gradients}
        passes = max(-(-len(s) // mb) for s in shares)  # FSDP2: every rank runs as many passes as the busiest
        return mine, kw | {"zero_weight_micros": [mini.select([0])] * (passes - len(mine))}

    def _sampler_correction(self, batch: RolloutBatch) -> dict[str, float]:
        """With a sampler that reports its log-probs (vllm): the gap to the trainer's
        old_logprob (algo/importance.py) and, per algo.tis, the truncated importance
        weights as batch.ratio_weight. {} when the rows carry no sampling log-probs."""
        if batch.sample_logprob is None:
            return {}
        a = self.cfg.algo
        batch.ratio_weight = tis_weights(batch.old_logprob, batch.sample_logprob, batch.response_mask, a.tis, a.tis_cap)
        out = sampler_gap(batch.old_logprob, batch.sample_logprob, batch.response_mask)
        if batch.ratio_weight is not None:
            valid = batch.response_mask > 0
            out["tis_weight_mean"] = float(batch.ratio_weight[valid].mean()) if valid.any() else float("nan")
            out["tis_capped_frac"] = float((batch.ratio_weight[valid] >= a.tis_cap).float().mean()) if valid.any() else float("nan")
        return out

    def _weigh(self, rows: RolloutBatch, gen: torch.Generator, stats: dict[str, list[float]]) -> tuple[float, float]:
        """Set rows.token_weight and rows.advantage (token_weights.method over these
        rows); stats accumulate; returns the (wall, CPU) seconds it took."""
        tw = self.cfg.token_weights
        if tw.method == "none":
            return 0.0, 0.0
        sw = Stopwatch()
        rows.token_weight, rows.advantage, st = compute_token_weights(
            tw.method, entropy=rows.entropy, mask=rows.response_mask, advantage=rows.advantage, rewards=rows.reward,
            group_id=rows.group_id, hidden=rows.hidden, is_positive=rows.advantage > 0, generator=gen,
            **method_params(tw, self.cfg.reward.correct_threshold),
        )
        for k, v in st.items():
            stats.setdefault(k, []).append(float(v))
        return sw.lap()

    def _update_set(self, batch: RolloutBatch, m: dict[str, float]) -> RolloutBatch | None:
        """The rows this rollout step trains on: the batch, or what the reward-balanced
        buffer releases (its stats go into m); None when there is nothing to train."""
        if self.buffer is not None:
            # sampling-time policy: old_logprob kept for the ratio; entropy (and ResRL's hidden
            # states) serve the update directly while the row is fresh
            self._sampling_forward(batch)
            self.buffer.add(batch, self.policy_version)
            batch, bst = self.buffer.pop_update_set(self.policy_version)
            m.update(bst)
        return batch if batch is not None and len(batch) > 0 else None

    # ---------------------------------------------------------- flip probe
    def _flip_before(self, batch: RolloutBatch) -> tuple[torch.Tensor, float] | None:
        """The flip probe's reference log-probs [B, T] before the coming update (and the
        seconds they took), on the same forward path as its "after"; None when
        probes.flip.every skips this update."""
        every = self.cfg.probes.flip.every
        if every <= 0 or (self.policy_version + 1) % every != 0:
            return None
        sw = Stopwatch()
        return self._forward_rows(batch, with_entropy=False)["logprob"], sw.lap()

    def _flip_probe(self, batch: RolloutBatch, before: torch.Tensor, t_before: tuple[float, float]) -> dict[str, float]:
        """Token-flip statistics of the update just applied: Delta log p of every
        token of the update set on the same forward path as `before` [B, T];
        per-token records to probes/flip_step_N.parquet with probes.flip.save_tokens."""
        pf = self.cfg.probes.flip
        sw = Stopwatch()
        delta = self._forward_rows(batch, with_entropy=False)["logprob"] - before  # [B, T]
        out = flip_stats(delta, batch.advantage, batch.response_mask, pf.eps)
        if pf.save_tokens and self.dist.main:
            rec = flip_records(delta, batch.advantage, batch.response_mask, batch.response_ids, batch.entropy, before,
                               self.policy_version, group_id=batch.group_id, prompt_index=batch.prompt_index)
            write_parquet(self.run_dir / "probes" / f"flip_step_{self.rollout_step}.parquet", rec)
        out.update(phase_metrics("flip_probe", add_seconds(t_before, sw.lap())))
        return out

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> EvalResult:
        """Held-out accuracy; RNG-isolated so it never changes the training trajectory."""
        from tokencredit.evaluate import evaluate_prompts

        ev = self.cfg.eval
        es = self.eval_set
        if not len(es):
            return EvalResult(float("nan"), 0.0, 0)
        k = ev.k or ev.n
        _, s = evaluate_prompts(
            self.model, self.tokenizer, es.prompts, es.answers, n=ev.n, k=k,
            temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
            gen_batch_size=self.cfg.rollout.gen_batch_size, progress=False, seed=self.cfg.train.seed + 1,
            verifier=self.verifier, name="eval", questions=es.questions, extras=es.extras,
            threshold=self.cfg.reward.correct_threshold,
        )
        return EvalResult(s[f"avg@{k}"], s["response_len_mean"], s["num_problems"] * ev.n, s[f"pass@{k}"], k)

    # ---------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        total = cfg.train.steps
        self.trackers = open_trackers(cfg, self.run_dir, resume_step=self.rollout_step) if self.dist.main else []
        if self.rollout_step == 0 and len(self.eval_set):
            e = self.evaluate()
            self.eval_history.append((0, e.accuracy))
            self._log({"step": 0, **_eval_row(e)})
        bar = tqdm(total=total, initial=self.rollout_step, desc="train", disable=not (cfg.output.progress and self.dist.main), dynamic_ncols=True)
        t_start = time.perf_counter()
        tokens_at_start = self.tokens_generated
        while self.rollout_step < total:
            sw = Stopwatch()
            batch, m = self.rollout()
            self.rollout_step += 1
            if self.first_reward is None:
                self.first_reward = m["reward_mean"]
            self.last_reward = m["reward_mean"]
            update_set = self._update_set(batch, m)
            if update_set is not None:
                before = self._flip_before(update_set)  # None when the probe skips this update
                m.update(self.update(update_set))
                if before is not None:
                    m.update(self._flip_probe(update_set, *before))
            else:
                m["skipped_update"] = 1.0
            step_time, step_cpu = sw.peek()
            m.update(phase_metrics("step", (step_time, step_cpu)))
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
        if len(self.eval_set):
            e = self.evaluate()
            self.eval_history.append((self.rollout_step, e.accuracy))
            self._log({"step": self.rollout_step, **_eval_row(e), "final": True})
            summary["eval_accuracy_start"] = self.eval_history[0][1]
            summary["eval_accuracy_end"] = e.accuracy
        final = self.model
        if self.fsdp and cfg.output.save_final:
            final = unsharded_copy(self.model)  # a collective; the plain model on rank 0
        if not self.dist.main:
            return summary
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.output.save_final:  # RUN_DIR/final/: a Hugging Face model directory (tokencredit/export.py)
            from tokencredit.export import export_final

            export_final(final, self.tokenizer, self.run_dir, dump_config(cfg), summary, dtype=cfg.model.dtype)
        for t in self.trackers:
            t.summary(summary)
            t.close()
        self.trackers = []
        return summary

    def _log(self, row: dict) -> None:
        if not self.dist.main:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", [row])
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
            "rollout_backend": self._backend_name(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
        }
        weights = None  # None: the model's own state dict
        if self.fsdp:  # full weights and optimizer state gathered to rank 0 (a collective), keyed by name
            weights, state["optimizer"] = full_state(self.model, self.optimizer)
        else:
            state["optimizer"] = self.optimizer.state_dict()
        if self.dist.world > 1:  # every rank's generators (a collective: every rank calls save)
            state["world"] = self.dist.world
            state["data_parallel"] = self.dp_mode
            state["rng_ranks"] = gather_object(state["rng"], self.dist)
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        if not self.dist.main:
            return self.ckpt_dir / f"step_{self.rollout_step}"
        return save_checkpoint(self.ckpt_dir, self.rollout_step, self.model, state, keep_last=self.cfg.output.keep_last, weights=weights)

    def _backend_name(self) -> str:
        return type(getattr(self.sampler, "inner", self.sampler)).__name__

    def _resume(self) -> None:
        ck = latest_checkpoint(self.ckpt_dir)
        if ck is None:
            # killed before its first checkpoint: nothing to restore, start over in the same directory
            msg = f"resume: {self.run_dir} has no complete checkpoint yet; starting it from step 0 with its saved config"
            log.warning(msg)
            if self.dist.main:
                print(f"tokencredit: {msg}", flush=True)
                (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
                (self.run_dir / "metrics.jsonl").write_text("")
            return
        st = read_checkpoint(ck)
        if int(st.get("world", 1)) != self.dist.world:
            raise ConfigError(f"resume: {ck} was written by {st.get('world', 1)} process(es); resume it with the same number "
                              f"(torchrun --nproc_per_node {st.get('world', 1)}), not {self.dist.world}")
        was_dp = st.get("data_parallel", self.dp_mode)
        if self.dist.world > 1 and was_dp != self.dp_mode:
            raise ConfigError(f"resume: {ck} was written with train.data_parallel={was_dp}; resume it with that, "
                              f"not {self.dp_mode} ({self.cfg.train.data_parallel})")
        self.rollout_step = st["rollout_step"]
        self.prompt_cursor = st.get("prompt_cursor", self.rollout_step * self.cfg.rollout.prompts_per_step)
        self.ds_surplus_total = st.get("ds_surplus_total", 0)
        self.policy_version = st["policy_version"]
        self.optim_steps = st["optim_steps"]
        self.tokens_generated = st["tokens_generated"]
        self.first_reward, self.last_reward = st["first_reward"], st["last_reward"]
        self.eval_history = [tuple(x) for x in st["eval_history"]]
        if self.fsdp:  # every rank reads the full tensors and keeps its shard
            load_full_state(self.model, load_weights(ck), self.optimizer, st["optimizer"])
        else:
            load_model_weights(ck, self.model)  # the state was read above
            self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng_ranks"][self.dist.rank] if "rng_ranks" in st else st["rng"])
        if self.buffer is not None and "buffer" in st:
            self.buffer.load_state_dict(st["buffer"])
        # drop metric rows logged after the checkpoint (the killed run's tail)
        mpath = self.run_dir / "metrics.jsonl"
        if mpath.exists() and self.dist.main:
            write_jsonl(mpath, [r for r in read_jsonl(mpath) if r.get("step", 0) <= self.rollout_step and not r.get("final")])
        was, now = st.get("rollout_backend"), self._backend_name()
        if was is not None and was != now and self.dist.main:
            msg = f"resume: the run sampled with {was} and continues with {now} (rollout.backend)"
            log.warning(msg)
            print(f"tokencredit: {msg}", flush=True)
        self.sampler.sync_weights(self.model, self.policy_version)
        log.info("resumed from %s (rollout step %d)", ck, self.rollout_step)


def _check_world(cfg: Config, world: int) -> None:
    """Batch sizes that cannot be split over `world` torchrun ranks: one line, before any model loads."""
    if world <= 1:
        return
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the {world} "
                          "ranks (each rank samples whole groups); change it or --nproc_per_node")
    if cfg.train.mini_batch_size < world:
        raise ConfigError(f"train.mini_batch_size={cfg.train.mini_batch_size} prompts per optimizer step cannot keep {world} ranks "
                          f"busy (each rank trains whole groups); set it >= {world} or use fewer processes (--nproc_per_node)")


def _rng_state() -> dict:
    """This process's torch (+ CUDA) and python RNG states, checkpoint-ready."""
    py = random.getstate()
    out = {"torch": torch.get_rng_state(), "python": list(py[1]), "python_pos": py[2], "python_version": py[0]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_pos"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _eval_row(e: EvalResult) -> dict[str, float]:
    """Metrics of one evaluation: eval_accuracy is avg@k (= accuracy for k = 1)."""
    return {"eval_accuracy": e.accuracy, "eval_pass_at_k": e.pass_at_k, "eval_k": e.k, "eval_len_mean": e.mean_len}

