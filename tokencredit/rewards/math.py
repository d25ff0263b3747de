"""Verifiable math reward: did the response's final answer equal the gold answer?

Pipeline for one (response, gold) pair, `score` and `MathVerifier` alike:

1. keep the response's tail (`TAIL_CHARS`, default 2,000 characters): the final
   answer is at the end, and math-verify's cost grows with its input;
2. `extract_answer`: the content of the last non-empty `\\boxed{...}` (balanced
   braces, nesting and escaped `\\{` handled), else the last number in the text
   (integer, decimal, `3/4`, `\\frac{3}{4}`, `1,000`), else no answer -> 0.0;
3. math-verify parses `\\boxed{<answer>}` and the gold wrapped in `$...$`
   (a raw gold string misparses: `(3, -2)` -> -2, `\\dfrac{3}{4}` -> nothing;
   see shared METHODS.md section 8) and `verify` compares them: 1.0 or 0.0.

Anything that goes wrong scores 0.0: an exception, a math-verify timeout, an
answer longer than `MAX_ANSWER_CHARS`, a worker that had to be killed.

Time limits. math-verify's own limits use `signal.alarm`, which works only in a
process's main thread and only in whole seconds (0.5 s silently parses
everything to nothing). So:

- `score` in the main thread calls math-verify directly with
  `parsing_timeout = timeout_seconds = timeout_s` (whole seconds, >= 1).
  Note that this cancels any `signal.alarm` the caller had set.
- `MathVerifier` with `workers=0` does the same in the main thread; called from
  any other thread, or with `workers >= 1`, it scores in worker *processes*
  (plain `python -c` subprocesses whose main thread runs math-verify with its
  alarms; ~1 s to start each) and also enforces a hard wall-clock limit per
  item (`item_limit_s`, default `3 * timeout_s + 1`): a worker that overruns
  it is killed and replaced.
- `score` from a non-main thread goes through a shared one-worker verifier.

Simplifications: one answer per response (the last boxed one), no multiple
choice letters or free text matching, answers over `MAX_ANSWER_CHARS` score 0.

Try it:
    from tokencredit.rewards import score, MathVerifier
    score(r"... so the answer is \\boxed{\\frac{3}{4}}", "0.75")     # 1.0
    with MathVerifier(workers=2) as v:
        v([r"\\boxed{47}", "46"], ["47", "47"])                      # [1.0, 0.0]
        v.stats                                                       # counters
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import Any, Sequence

logging.getLogger("math_verify").setLevel(logging.ERROR)

TAIL_CHARS = 2000  # characters of the response kept before extraction
MAX_ANSWER_CHARS = 400  # longer extracted answers score 0 without parsing
CACHE_SIZE = 65536  # (answer, gold) -> reward memo entries in MathVerifier
WORKER_START_LIMIT_S = 120.0  # time a fresh worker may take to import math-verify

# ------------------------------------------------------------------ extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_BARE_ARG = re.compile(r"[^\s{}$\\]+")
# last-number fallback, most specific alternatives first:
#   \frac{3}{4} | 1,234,567.5 | 3/4 | 3.25 | .5   (optional sign, not after a word)
_SIGN = r"(?<![\w)\]}])-"
_NUMBER = re.compile(
    rf"(?:{_SIGN})?\\[dt]?frac\{{\s*\d+\s*\}}\{{\s*\d+\s*\}}"
    rf"|(?:{_SIGN})?(?<![\d.,])\d{{1,3}}(?:,\d{{3}})++(?:\.\d+)?(?![\d,])"
    rf"|(?:{_SIGN})?\d++(?:\.\d++)?(?:\s*/\s*\d++)?"
    rf"|(?:{_SIGN})?\.\d++"
)


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of every unescaped `{` -> index of its matching `}`; one O(n) pass."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(r"\\[{}]|[{}]", text):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _last_boxed(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{...}` (or `\\boxed 5`), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    pairs = _brace_pairs(text)
    for end in reversed(starts):
        i = end
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = pairs.get(i)
            content = text[i + 1 : close].strip() if close is not None else ""
        else:  # `\boxed 47` without braces: the next run of non-space characters
            m = _BARE_ARG.match(text, i)
            content = m.group().rstrip(".,;:") if m else ""
        if content:
            return content
    return None


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    if last is None:
        return None
    tok = last.group()
    if "frac" not in tok:
        tok = re.sub(r"\s+", "", tok)
        if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", tok):
            tok = tok.replace(",", "")
    return tok


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: last non-empty `\\boxed{}` content, else the last
    number (`-3`, `2.5`, `3/4`, `\\frac{3}{4}`, `1,000` -> `1000`), else None.

    Linear time in len(text) (brace matching is one pass), so it is safe on
    adversarial inputs; callers should still truncate very long texts.
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _last_boxed(text)
    return boxed if boxed is not None else _last_number(text)


# ------------------------------------------------------------------ math-verify core


def _import_math_verify():
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    return parse, verify, TimeoutException


def _wrap_gold(gold: str) -> str:
    """Gold as one `$...$` math span: unescaped `$` inside are dropped (golds like
    `$221,$8$` or `a+$ $b` would otherwise parse as their last span only), and
    so is a sentence-final period."""
    if "\\boxed" in gold:
        return gold
    return "$" + re.sub(r"(?<!\\)\$", " ", gold).strip().rstrip(".").strip() + "$"


_GOLD_CACHE: dict[tuple[str, int], tuple] = {}


def _parse_gold(gold: str, timeout_s: int) -> tuple:
    """Parsed gold, memoised (a GRPO group shares one gold). Failures are not
    memoised: a parse that timed out on a busy machine is retried next time."""
    key = (gold, timeout_s)
    if key not in _GOLD_CACHE:
        parse, _, _ = _import_math_verify()
        parsed = tuple(parse(_wrap_gold(gold), parsing_timeout=timeout_s))
        if not parsed:
            return parsed
        if len(_GOLD_CACHE) >= 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[key] = parsed
    return _GOLD_CACHE[key]


def _verify_answer(answer: str, gold: str, timeout_s: int) -> float:
    """math-verify `\\boxed{answer}` against gold; must run in a main thread.

    Never raises: exceptions and math-verify's TimeoutException (a
    BaseException) give 0.0.
    """
    parse, verify, timeout_exc = _import_math_verify()
    try:
        gold_parsed = _parse_gold(gold, timeout_s)
        if not gold_parsed:
            return 0.0
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s)
        if not pred:
            return 0.0
        return 1.0 if verify(list(gold_parsed), pred, timeout_seconds=timeout_s) else 0.0
    except (Exception, timeout_exc):
        return 0.0


def _timed_verify(answer: str, gold: str, timeout_s: int) -> tuple[float, bool]:
    """(reward, cacheable): a 0.0 that took half the time limit or more may be a
    math-verify timeout on a busy machine, so it is not worth remembering."""
    t0 = time.monotonic()
    r = _verify_answer(answer, gold, timeout_s)
    return r, r == 1.0 or time.monotonic() - t0 < timeout_s / 2


def _prepare(response: Any, gold: Any, tail_chars: int = TAIL_CHARS) -> tuple[str, str] | None:
    """(answer, gold) ready for math-verify, or None when the reward is surely 0."""
    if not isinstance(response, str) or gold is None:
        return None
    gold = gold if isinstance(gold, str) else str(gold)
    answer = extract_answer(response[-tail_chars:])
    if not answer or len(answer) > MAX_ANSWER_CHARS or not gold.strip():
        return None
    return answer, gold


def _check_timeout(timeout_s: Any) -> int:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
        raise ValueError(
            f"timeout_s must be a whole number of seconds >= 1 (math-verify uses signal.alarm), got {timeout_s!r}"
        )
    return timeout_s


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def score(response: str, gold: str, timeout_s: int = 1) -> float:
    """1.0 if the final answer of `response` equals `gold` per math-verify, else 0.0.

    Never raises: any failure scores 0.0. `timeout_s` is rounded up to whole
    seconds (at least 1). In the main thread math-verify runs here under its
    own signal-based limits (measured: at most about 2-3 x timeout_s even on
    adversarial inputs); from any other thread the pair is scored by a shared
    one-worker `MathVerifier` (a process with a hard wall-clock limit).
    """
    try:
        t = max(1, math.ceil(float(timeout_s)))
        prepared = _prepare(response, gold)
        if prepared is None:
            return 0.0
        if _in_main_thread():
            return _verify_answer(*prepared, timeout_s=t)
        return _shared_verifier(t)([response], [gold])[0]
    except Exception:
        return 0.0


_SHARED: dict[int, "MathVerifier"] = {}
_SHARED_LOCK = threading.Lock()


def _shared_verifier(timeout_s: int) -> "MathVerifier":
    with _SHARED_LOCK:
        if timeout_s not in _SHARED:
            _SHARED[timeout_s] = MathVerifier(timeout_s=timeout_s, workers=1)
        return _SHARED[timeout_s]


# ------------------------------------------------------------------ worker processes
# Workers are plain `python -c` subprocesses talking over two pipes, not
# multiprocessing children: spawn / forkserver children re-import the caller's
# __main__ (a script without an `if __name__ == "__main__"` guard would run again
# inside every worker) and fork is unsafe in a threaded trainer.

_WORKER_CODE = "import sys; from tokencredit.rewards.math import _worker_main; _worker_main(*map(int, sys.argv[1:]))"


def _worker_main(read_fd: int, write_fd: int, timeout_s: int) -> None:
    """Worker process loop: receive (index, answer, gold), send (index, reward)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    _verify_answer("1", "1", timeout_s)  # import + warm-up (~1 s) before the first deadline
    try:
        outbox.send(("ready", os.getpid()))
        while (msg := inbox.recv()) is not None:
            idx, answer, gold = msg
            outbox.send((idx, _timed_verify(answer, gold, timeout_s)))
    except (EOFError, OSError):
        return  # the parent closed its pipes or died


class _Worker:
    """One worker process and the parent's ends of its two pipes.

    The child runs `code` (default: the math-verify loop `_worker_main`) with
    argv = [read fd, write fd, *args]; `tokencredit.rewards.functions` runs user
    reward functions on the same kind of worker with its own `code`.
    """

    def __init__(self, *args: Any, code: str = _WORKER_CODE):
        child_in, self._out_fd = os.pipe()
        in_fd, child_out = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(child_in), str(child_out), *map(str, args)],
                pass_fds=(child_in, child_out),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self.send_conn = Connection(self._out_fd, readable=False)
        self.conn = Connection(in_fd, writable=False)
        self.ready = False
        self.started = time.monotonic()
        self.job: tuple[int, float] | None = None  # (item index, deadline)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        self._close_pipes()

    def stop(self) -> None:
        try:
            self.send_conn.send(None)
            self.proc.wait(timeout=1)
        except Exception:
            pass
        self.kill()

    def _close_pipes(self) -> None:
        for c in (self.send_conn, self.conn):
            try:
                c.close()
            except Exception:
                pass


_LIVE: "weakref.WeakSet[MathVerifier]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for v in list(_LIVE):
        v.close()


class MathVerifier:
    """Batch math reward, safe from any thread and against adversarial outputs.

    Args:
        timeout_s: math-verify parse / verify limit, whole seconds >= 1.
        workers: 0 = score in-process when called from the main thread and via
            one worker process otherwise; n >= 1 = always n worker processes.
        item_limit_s: hard wall-clock limit per item in a worker (default
            `3 * timeout_s + 1`); an overrunning worker is killed and replaced.
        tail_chars: characters of each response kept before extraction.

    `stats` counts items, cache hits, no-answer items, hard timeouts (killed
    workers), crashed workers and worker starts since construction.
    """

    def __init__(
        self,
        timeout_s: int = 1,
        workers: int = 0,
        item_limit_s: float | None = None,
        tail_chars: int = TAIL_CHARS,
    ):
        self.timeout_s = _check_timeout(timeout_s)
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        self.workers = workers
        self.item_limit_s = float(item_limit_s) if item_limit_s is not None else 3.0 * timeout_s + 1.0
        if self.item_limit_s <= 0:
            raise ValueError(f"item_limit_s must be > 0, got {item_limit_s!r}")
        self.tail_chars = tail_chars
        self.stats: dict[str, int] = dict.fromkeys(
            ("items", "cache_hits", "no_answer", "timeouts", "crashes", "worker_starts"), 0
        )
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: list[_Worker] = []
        self._closed = False
        _LIVE.add(self)

    # ---------------------------------------------------------------- public
    def __call__(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
        """Rewards in [0, 1] for each (response, gold) pair, in order."""
        if len(responses) != len(golds):
            raise ValueError(f"got {len(responses)} responses but {len(golds)} golds")
        with self._lock:
            if self._closed:
                raise RuntimeError("MathVerifier is closed")
            return self._score_batch(responses, golds)

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        with self._lock:
            self._closed = True
            for w in self._pool:
                w.stop()
            self._pool = []

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            for w in self._pool:
                w.kill()
        except Exception:
            pass

    # ---------------------------------------------------------------- internals
    def _score_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
        rewards = [0.0] * len(responses)
        todo: dict[tuple[str, str], list[int]] = {}  # unique (answer, gold) -> rows
        for i, (resp, gold) in enumerate(zip(responses, golds)):
            self.stats["items"] += 1
            try:
                prepared = _prepare(resp, gold, self.tail_chars)
            except Exception:
                prepared = None
            if prepared is None:
                self.stats["no_answer"] += 1
            elif prepared in self._cache:
                self.stats["cache_hits"] += 1
                self._cache.move_to_end(prepared)
                rewards[i] = self._cache[prepared]
            else:
                todo.setdefault(prepared, []).append(i)
        keys = list(todo)
        if not keys:
            return rewards
        if self.workers == 0 and _in_main_thread():
            outcomes = [_timed_verify(a, g, self.timeout_s) for a, g in keys]
        else:
            outcomes = self._run_pool(keys)
        for key, (r, cacheable) in zip(keys, outcomes):
            for i in todo[key]:
                rewards[i] = r
            if cacheable:
                self._remember(key, r)
        return rewards

    def _remember(self, key: tuple[str, str], r: float) -> None:
        self._cache[key] = r
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _start_worker(self) -> _Worker:
        self.stats["worker_starts"] += 1
        return _Worker(self.timeout_s)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._pool[self._pool.index(w)] = self._start_worker()

    def _run_pool(self, keys: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(reward, cacheable) for each key, scored on the worker processes; an
        item whose worker was killed or died scores (0.0, False)."""
        n = max(1, self.workers)
        while len(self._pool) < n:
            self._pool.append(self._start_worker())
        results = [(0.0, False)] * len(keys)
        queue = deque(range(len(keys)))
        while queue or any(w.job for w in self._pool):
            now = time.monotonic()
            for w in list(self._pool):
                if w.ready and w.job is None and queue:
                    j = queue.popleft()
                    try:
                        w.send_conn.send((j, *keys[j]))
                        w.job = (j, now + self.item_limit_s)
                    except (OSError, ValueError):  # dead worker: retry on a fresh one
                        self.stats["crashes"] += 1
                        queue.appendleft(j)
                        self._replace(w)
            self._wait_and_collect(results)
        return results

    def _wait_and_collect(self, results: list[tuple[float, bool]]) -> None:
        now = time.monotonic()
        deadlines = [w.job[1] if w.job else w.started + WORKER_START_LIMIT_S for w in self._pool if w.job or not w.ready]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
        by_conn = {w.conn: w for w in self._pool}
        for conn in wait_connections(list(by_conn), timeout=wait_s):
            w = by_conn[conn]
            try:
                tag, value = conn.recv()
            except (EOFError, OSError, ValueError):  # worker died
                if not w.ready:
                    raise RuntimeError("math-verify worker exited during start-up") from None
                self.stats["crashes"] += 1
                self._replace(w)
                continue
            if tag == "ready":
                w.ready = True
            elif w.job and tag == w.job[0]:
                results[tag] = (float(value[0]), bool(value[1]))
                w.job = None
        now = time.monotonic()
        for w in list(self._pool):
            if w.job and now > w.job[1]:
                self.stats["timeouts"] += 1
                self._replace(w)
            elif not w.ready and now > w.started + WORKER_START_LIMIT_S:
                raise RuntimeError(f"math-verify worker did not start within {WORKER_START_LIMIT_S:.0f} s")
