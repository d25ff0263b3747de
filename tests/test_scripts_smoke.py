"""Every script in bench/ and scripts/ runs at its smoke size (`--smoke`: tiny model, 1-2 steps, a
few tokens, outputs to a temp dir), so a refactor that breaks one fails here instead of in a
user's hands. Each runs in a fresh subprocess as a user would start it, and must print a line
only its successful end prints. Also: the scripts import only public names of the package and
patch none of its modules, and bench/gpu_step.py runs without pydantic and math-verify (the
GPU machine has neither).

Cost on 2 cores: about 255 s for the whole file (measured 2026-12-05 on this project's CPU box; the
`seconds` column gives each script's own run)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script, extra args, a substring only a successful run prints, optional module it needs, seconds measured here
SMOKE = [
    ("bench/batching_ablation.py", [], "| qb_rb | 1 | ", None, 30),
    ("bench/coupling_bench.py", [], "projection from these fits", None, 11),
    ("bench/dp_scaling.py", [], "ratio (2 x 1 ddp) / (1 x 2): ", None, 26),
    ("bench/forward_memory.py", [], "step MiB = peak RSS during the measured steps", None, 21),
    ("bench/token_weight_overhead.py", [], "| resrl | ", None, 9),
    ("bench/value_cache_bench.py", [], "identical tokens in all modes: True", None, 7),
    ("bench/gpu_step.py", [], "gpu_step: wrote ", None, 7),
    ("bench/precision_memory.py", [], "state MiB = RSS after a warm-up step", None, 27),
    ("bench/rollout_backends.py", [], "rollout backends: done, ", None, 16),
    ("bench/vs_trl.py", [], "**tiny random Llama", "trl", 32),
    ("scripts/check_report_render.py", [], "OK: ", "exe:chromium", 10),
    ("scripts/replicate.py", [], "replication: finished parts ", None, 23),
]


def _scripts() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in ("bench", "scripts") for p in (ROOT / d).glob("*.py"))


def test_every_script_has_a_smoke_run():
    assert sorted(s for s, *_ in SMOKE) == _scripts()


def _run(script: str, args: list[str], env_extra: dict | None = None, prelude: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT), **(env_extra or {})}
    if prelude is None:
        cmd = [sys.executable, script, "--smoke", *args]
    else:  # run the script after `prelude` in the same interpreter (runpy keeps __main__ semantics)
        code = f"{prelude}\nimport runpy, sys\nsys.argv = {[script, '--smoke', *args]!r}\nrunpy.run_path({script!r}, run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script,args,expect,needs,seconds", SMOKE, ids=[s for s, *_ in SMOKE])
def test_smoke(script, args, expect, needs, seconds):
    if needs is not None and needs.startswith("exe:"):
        if shutil.which(needs[4:]) is None:
            pytest.skip(f"{script} needs {needs[4:]} on PATH (.ci/run installs it)")
    elif needs is not None:
        pytest.importorskip(needs, reason=f"{script} needs {needs} (make install-bench / install-vllm; .ci/run installs it)")
    p = _run(script, args)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{script} --smoke exited {p.returncode}:\n{out[-3000:]}"
    assert expect in out, f"{script} --smoke did not print {expect!r}:\n{out[-3000:]}"
    git = subprocess.run(["git", "status", "--porcelain", "--", "docs", "runs"], cwd=ROOT, capture_output=True, text=True)
    assert "docs/results" not in git.stdout, f"{script} --smoke wrote into docs/results:\n{git.stdout}"


def test_gpu_step_runs_without_pydantic_and_math_verify():
    """The GPU machine has torch and transformers only: importing pydantic or math_verify must not happen."""
    block = "import sys\nfor m in ('pydantic', 'math_verify', 'tokencredit.config'):\n    sys.modules[m] = None  # import -> ImportError"
    p = _run("bench/gpu_step.py", [], prelude=block)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def _private_uses(path: Path) -> list[str]:
    """`from tokencredit... import _name`, `tokencredit...._name`, and assignments to attributes of an
    imported tokencredit module (monkeypatching) in one script."""
    tree = ast.parse(path.read_text())
    bad, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokencredit"):
            bad += [f"{path.name}:{node.lineno} imports {a.name} from {node.module}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("tokencredit")}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in modules:
                bad.append(f"{path.name}:{node.lineno} assigns {t.value.id}.{t.attr}")
    return bad


def test_scripts_use_only_public_names_and_patch_nothing():
    bad = [b for s in _scripts() for b in _private_uses(ROOT / s)]
    assert not bad, bad
    # the check itself catches both forms
    probe = ROOT / "tests" / "_probe_private.py"
    probe.write_text("import tokencredit.trainer as t\nfrom tokencredit.rollout.hf import _shared_prompt_cache\nt.generate_hf = None\n")
    try:
        assert len(_private_uses(probe)) == 2
    finally:
        probe.unlink()
