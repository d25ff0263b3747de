"""Every `tokencredit ...` command line quoted in README.md and docs/**/*.md parses with the real
CLI parser, and every `key=value` override quoted there names an option of the config schema
with a value that option accepts: the docs cannot drift from the code without this going red.

What is read: fenced code blocks (with `\\` line continuations joined) and inline code spans.
Skipped: usage synopses (a line with `[--` or an `a|b` alternative), `...`, and inline spans
that merely name a command (`tokencredit probe value`). ALL-CAPS words (RUN_DIR, N) are placeholders: they stand in for a
value, so they parse as "1" and their type is not checked."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
SUBCOMMANDS = {"train", "eval", "export", "report", "probe", "polarity", "masking", "coupling", "value"}
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)=(.*)$")


def _snippets(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, inline) of every code line (continuations joined) and inline code span."""
    out, in_block, buf, start = [], False, "", 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if not buf:
                start = i
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            out.append((start, buf + line, False))
            buf = ""
        else:
            out.extend((i, m, True) for m in re.findall(r"`([^`]+)`", line))
    return out


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `tokencredit`) of every quoted command line."""
    found = []
    for path in DOCS:
        for line_no, text, inline in _snippets(path):
            text = re.sub(r"(^|\s)#.*$", "", text).strip()  # a shell comment
            m = re.search(r"(?:^|\s|-m\s)tokencredit(\s.*|$)", text)
            if not m or "..." in text or "[--" in text or re.search(r"\w\|\w", text):
                continue
            if text.split()[0] not in ("tokencredit", "python", "python3", ".venv/bin/python", "torchrun", ".venv/bin/tokencredit"):
                continue  # prose inside a code span that happens to name the command
            try:
                argv = shlex.split(m.group(1))
            except ValueError:
                continue
            if inline and all(a in SUBCOMMANDS for a in argv):
                continue  # `tokencredit probe value` in a sentence names the command, it does not run it
            argv = ["1" if PLACEHOLDER.match(a) else a for a in argv]
            found.append((f"{path.relative_to(ROOT)}:{line_no}", argv))
    return found


def _overrides() -> list[tuple[str, str, str]]:
    """(where, key, value) of every quoted dotted override, in commands and alone."""
    found = []
    for path in DOCS:
        for line_no, text, _ in _snippets(path):
            try:
                words = shlex.split(re.sub(r"(^|\s)#.*$", "", text))
            except ValueError:
                words = text.split()
            for w in words:
                m = OVERRIDE.match(w)
                if m and not w.startswith(("http", "tokencredit.")):
                    found.append((f"{path.relative_to(ROOT)}:{line_no}", m.group(1), m.group(2)))
    return found


COMMANDS = _commands()
OVERRIDES = _overrides()


def test_the_docs_quote_commands_and_overrides():
    # precondition: the scan finds what the README plainly holds (a broken scanner would pass everything below)
    assert len(COMMANDS) >= 30 and len(OVERRIDES) >= 40, (len(COMMANDS), len(OVERRIDES))
    assert any(argv[:1] == ["train"] for _, argv in COMMANDS) and any(argv[:2] == ["probe", "value"] for _, argv in COMMANDS)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_quoted_command_parses(where, argv, capsys):
    from tokencredit.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:  # `--help` prints and exits 0
            return
        pytest.fail(f"{where}: `tokencredit {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()[-300:]}")
    cfg = getattr(args, "config", None)
    if cfg and not cfg.startswith("/"):
        assert (ROOT / cfg).is_file(), f"{where}: --config {cfg} is not a file of this repository"


@pytest.mark.parametrize("where,key,value", OVERRIDES, ids=[f"{w}:{k}" for w, k, _ in OVERRIDES])
def test_quoted_override_is_an_option_with_a_valid_value(where, key, value):
    from pydantic import TypeAdapter

    from tokencredit.config import Config, _leaf_paths

    leaves = _leaf_paths(Config)
    assert key in leaves, f"{where}: `{key}` is not a config option (tokencredit train --help lists them)"
    if PLACEHOLDER.match(value) or not value:
        return
    parsed = yaml.safe_load(value)
    if key == "reward.functions" and isinstance(parsed, list):  # specs are checked when the workers start
        return
    TypeAdapter(leaves[key].annotation).validate_python(parsed)
