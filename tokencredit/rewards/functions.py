"""Pluggable rewards: the `reward.functions` of a run, combined with weights.

A spec names one reward function:

- `math_verify`: the built-in math reward (`MathVerifier`, 1.0 when the final
  answer equals the gold answer, else 0.0); the default;
- `package.module:fn`: a function importable from the trainer's environment;
- `path/to/file.py:fn`: a function defined in a file (a relative path is taken
  from the working directory; the file's folder is put on `sys.path`, so it
  may import its neighbours).

A user function is called once per rollout step (one call per generation
round) for the whole batch of rows:

    fn(responses: list[str], answers: list[str], prompts: list[str], **extra_columns) -> list[float]

`prompts` are the questions as in the data file (no chat markup); every other
column of a data file arrives as a keyword argument holding one value per row
(None where a row lacks it). A function without `**kwargs` gets only the
columns it names. The combined reward of a row is sum_i weight_i * r_i
(`reward.weights`, 1.0 each by default, as TRL's `reward_weights`).

Isolation: each user function lives in its own worker process (the same
`python -c` worker with two pipes that runs math-verify in `math.py`), loaded
once when the trainer starts, so a load error ends the run before any
training with one line naming the spec. A call that raises, returns something
other than one finite number per row, or does not answer within
`reward.timeout_s` scores 0.0 for every row of that call; the worker is killed
and restarted when it hung or died. Each failure is logged as a warning naming
the function and counted in the cumulative metric `reward/<name>/failures`;
nothing a reward function does can stop or hang the run.

Simplifications: calls are batched per rollout step, not per row (a function
that fails fails for the whole batch); no async rewards, no reward models on
the GPU; processes a user function starts itself are not killed with it.

Try it:
    from tokencredit.rewards.functions import RewardFunctions
    with RewardFunctions(["math_verify", "my_rewards.py:brevity"], weights=[1.0, 0.1]) as rf:
        rewards, stats = rf([r"\\boxed{4}", "5"], ["4", "4"], ["2+2?", "2+2?"])
        # rewards: [1.0 + 0.1 * brevity, 0.1 * brevity]; stats: reward/<name>/mean, reward/<name>/failures
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import inspect
import logging
import math
import os
import signal
import sys
import time
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

from tokencredit.rewards.math import WORKER_START_LIMIT_S, MathVerifier, _Worker

log = logging.getLogger("tokencredit")

BUILTINS = ("math_verify",)  # built-in reward names (not user functions)
RESERVED = ("responses", "answers", "prompts")  # extra columns with these names are not passed
ERROR_CHARS = 300  # a failure message is cut to this many characters


class RewardSpecError(ValueError):
    """A spec that is not `math_verify`, `package.module:fn` or `path.py:fn`."""


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """`spec` -> (name, target, function): target is None for a built-in, a module
    path for `package.module:fn`, a file path (ends in .py) for `file.py:fn`.
    Pure syntax check (nothing is imported); raises RewardSpecError."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"{spec!r} is not a reward function spec")
    spec = spec.strip()
    if spec in BUILTINS:
        return spec, None, spec
    target, sep, fn = spec.rpartition(":")
    target = target.strip()
    fn = fn.strip()
    hint = f"use 'package.module:function', 'path/to/file.py:function' or a built-in ({', '.join(BUILTINS)})"
    if not sep or not target or not fn.isidentifier():
        raise RewardSpecError(f"{spec!r} is not a reward function spec; {hint}")
    if not target.endswith(".py") and not all(part.isidentifier() for part in target.split(".")):
        raise RewardSpecError(f"{spec!r}: {target!r} is neither a dotted module name nor a .py file; {hint}")
    return fn, target, fn


def load_function(spec: str) -> Callable:
    """Import the function a spec names (in the calling process). Raises the
    import's own exception, or TypeError when the name is not callable."""
    _, target, fn_name = parse_spec(spec)
    if target is None:
        raise ValueError(f"{spec!r} is a built-in reward, not a function to import")
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        mod_name = f"tokencredit_reward_{path.stem}"
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module
        mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, fn_name):
        raise AttributeError(f"{target} has no attribute {fn_name!r}")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise TypeError(f"{target}:{fn_name} is a {type(fn).__name__}, not a function")
    return fn


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (f"{type(e).__name__}: {msg}" if msg else type(e).__name__)[:ERROR_CHARS]


def _as_floats(out: Any, n: int) -> list[float]:
    """The user function's return value as n finite floats, or ValueError/TypeError."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy array / torch tensor
    if not isinstance(out, (list, tuple)):
        raise TypeError(f"returned {type(out).__name__}, expected a list of {n} floats")
    if len(out) != n:
        raise ValueError(f"returned {len(out)} values for {n} rows")
    vals = []
    for i, x in enumerate(out):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"value {i} is {type(x).__name__}, expected a float")
        if not math.isfinite(x):
            raise ValueError(f"value {i} is {x}")
        vals.append(float(x))
    return vals


# ------------------------------------------------------------------ worker process

_FN_WORKER_CODE = (
    "import sys; from tokencredit.rewards.functions import _fn_worker_main; "
    "_fn_worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
)


def _fn_worker_main(read_fd: int, write_fd: int, spec: str) -> None:
    """Worker loop: load `spec`, then receive (seq, responses, answers, prompts,
    extras) and send (seq, ("ok", floats) | ("error", message))."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        fn = load_function(spec)
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # no signature (some C callables): pass every column
            params = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        named = {p.name for p in params}
    except BaseException as e:  # noqa: BLE001 - any load failure is reported, not raised
        outbox.send(("error", _one_line(e)))
        return
    try:
        outbox.send(("ready", os.getpid()))
        while (msg := inbox.recv()) is not None:
            seq, responses, answers, prompts, extras = msg
            kw = {k: v for k, v in extras.items() if takes_all or k in named}
            try:
                outbox.send((seq, ("ok", _as_floats(fn(responses, answers, prompts, **kw), len(responses)))))
            except BaseException as e:  # noqa: BLE001 - SystemExit included: the worker lives on
                outbox.send((seq, ("error", _one_line(e))))
    except (EOFError, OSError):
        return  # the parent closed its pipes or died


class _FunctionWorker:
    """One user reward function in its own worker process, restarted after a
    hang or a crash."""

    def __init__(self, spec: str, timeout_s: float):
        self.spec, self.timeout_s = spec, timeout_s
        self.worker: _Worker | None = None
        self.seq = 0
        self.deadline = 0.0

    def start(self) -> str | None:
        """Start the worker and wait until the function is loaded; an error
        message, or None when it is ready."""
        self.stop()
        w = _Worker(self.spec, code=_FN_WORKER_CODE)
        try:
            if not w.conn.poll(WORKER_START_LIMIT_S):
                raise TimeoutError(f"not loaded within {WORKER_START_LIMIT_S:.0f} s")
            tag, value = w.conn.recv()
        except (EOFError, OSError, TimeoutError) as e:
            w.kill()
            return f"worker died while loading ({_one_line(e)})"
        if tag != "ready":
            w.kill()
            return str(value)
        self.worker = w
        return None

    def submit(self, responses, answers, prompts, extras) -> str | None:
        """Send one call; an error message when it could not be sent."""
        if self.worker is None or self.worker.proc.poll() is not None:
            err = self.start()
            if err is not None:
                return err
        self.seq += 1
        try:
            self.worker.send_conn.send((self.seq, list(responses), list(answers), list(prompts), extras))
        except Exception as e:  # noqa: BLE001 - dead worker or unpicklable extra column
            self.stop()
            return f"could not send the call ({_one_line(e)})"
        self.deadline = time.monotonic() + self.timeout_s
        return None

    def collect(self) -> tuple[list[float] | None, str | None]:
        """(floats, None) or (None, error message); waits until the deadline at most."""
        w = self.worker
        try:
            while w.conn.poll(max(0.0, self.deadline - time.monotonic())):
                seq, (status, value) = w.conn.recv()
                if seq == self.seq:
                    return (value, None) if status == "ok" else (None, str(value))
        except (EOFError, OSError, ValueError):
            self.stop()
            return None, "worker process died"
        self.stop()  # hung: kill it; the next call starts a fresh one
        return None, f"no answer within reward.timeout_s={self.timeout_s:g} s (worker killed)"

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None


# ------------------------------------------------------------------ the combined reward


class RewardFunctions:
    """Weighted sum of reward functions, safe against raising or hanging ones.

    Args:
        specs: reward function specs (see the module docstring).
        weights: one weight per spec (None = 1.0 each).
        timeout_s: wall-clock limit of one call of a user function.
        math_timeout_s: math-verify's own parse/verify limit (whole seconds).

    `__call__(responses, answers, prompts, extras)` -> (rewards, stats): rewards
    is one combined float per row; stats holds `reward/<name>/mean` (the mean
    of that function's raw values over the rows of this call, 0.0 for a failed
    call) and `reward/<name>/failures` (failed calls since construction).
    User functions are loaded in `start()` (first call at the latest); a spec
    that cannot be loaded raises ValueError naming it.
    """

    def __init__(
        self,
        specs: Sequence[str] = ("math_verify",),
        weights: Sequence[float] | None = None,
        timeout_s: float = 30.0,
        math_timeout_s: int = 1,
    ):
        parsed = [parse_spec(s) for s in specs]
        if not parsed:
            raise ValueError("at least one reward function is needed")
        self.specs = [s.strip() for s in specs]
        self.names = [p[0] for p in parsed]
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ValueError(f"two reward functions named {dup[0]!r}; metric names must be unique")
        self.weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(specs):
            raise ValueError(f"{len(self.weights)} weights for {len(specs)} reward functions")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.failures = dict.fromkeys(self.names, 0)
        self.math_timeout_s = math_timeout_s
        self._math: MathVerifier | None = None
        self._workers: dict[str, _FunctionWorker] = {}
        for name, spec, (_, target, _) in zip(self.names, self.specs, parsed):
            if target is not None:  # a file path is fixed now, so a later chdir does not lose it
                fixed = f"{Path(target).resolve()}:{name}" if target.endswith(".py") else spec
                self._workers[name] = _FunctionWorker(fixed, timeout_s)
        self._started = False
        _LIVE.add(self)

    def start(self) -> "RewardFunctions":
        """Load every user function in its worker; ValueError on the first that fails."""
        if "math_verify" in self.names and self._math is None:
            self._math = MathVerifier(timeout_s=self.math_timeout_s)
        for spec, name in zip(self.specs, self.names):
            if name in self._workers and self._workers[name].worker is None:
                err = self._workers[name].start()
                if err is not None:
                    self.close()
                    raise ValueError(f"reward.functions: cannot load {spec!r}: {err}")
        self._started = True
        return self

    def __call__(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        prompts: Sequence[str] | None = None,
        extras: dict[str, Sequence[Any]] | None = None,
    ) -> tuple[list[float], dict[str, float]]:
        n = len(responses)
        if len(answers) != n:
            raise ValueError(f"got {n} responses but {len(answers)} answers")
        if not self._started:
            self.start()
        prompts = [""] * n if prompts is None else list(prompts)
        extras = {k: list(v) for k, v in (extras or {}).items() if k not in RESERVED}
        values: dict[str, list[float]] = {}
        errors: dict[str, str] = {}
        sent = []
        for name, w in self._workers.items():  # all user functions run at once
            err = w.submit(responses, answers, prompts, extras)
            if err is None:
                sent.append(name)
            else:
                errors[name] = err
        if self._math is not None:
            values["math_verify"] = self._math(list(responses), list(answers))
        for name in sent:
            vals, err = self._workers[name].collect()
            if err is None:
                values[name] = vals
            else:
                errors[name] = err
        for name, err in errors.items():
            self.failures[name] += 1
            log.warning("reward function %s failed (%d so far); its %d rows score 0: %s", name, self.failures[name], n, err)
            values[name] = [0.0] * n
        rewards = [math.fsum(wt * values[nm][i] for nm, wt in zip(self.names, self.weights)) for i in range(n)]
        stats: dict[str, float] = {}
        for name in self.names:
            stats[f"reward/{name}/mean"] = math.fsum(values[name]) / n if n else float("nan")
            stats[f"reward/{name}/failures"] = float(self.failures[name])
        return rewards, stats

    def close(self) -> None:
        """Stop the worker processes (idempotent); a later call starts them again."""
        for w in self._workers.values():
            w.stop()
        if self._math is not None:
            self._math.close()
            self._math = None
        self._started = False

    def __enter__(self) -> "RewardFunctions":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            for w in self._workers.values():
                w.stop()
        except Exception:
            pass


_LIVE: "weakref.WeakSet[RewardFunctions]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for rf in list(_LIVE):
        rf.close()


def start_reward_functions(reward_cfg) -> RewardFunctions:
    """The run's `reward` config section as started RewardFunctions; a spec that
    cannot be loaded is one ConfigError line (before any model is loaded)."""
    from tokencredit.config import ConfigError  # config imports the rollout registry, which imports this module

    rf = RewardFunctions(reward_cfg.functions, reward_cfg.weights, reward_cfg.timeout_s)
    try:
        return rf.start()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def merge_stats(parts: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Stats of several calls (rows, stats) as one: `/mean` keys are row-weighted
    means, every other key (the cumulative `/failures`) takes its last value."""
    out: dict[str, float] = {}
    rows = sum(r for r, _ in parts)
    for key in parts[-1][1] if parts else ():
        if key.endswith("/mean"):
            out[key] = math.fsum(r * st[key] for r, st in parts) / rows if rows else float("nan")
        else:
            out[key] = parts[-1][1][key]
    return out
