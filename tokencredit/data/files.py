"""Problems from files: `.jsonl` (one JSON object per line) or `.parquet`.

Each row needs a question (field `prompt`, else `problem`, or the field you
name) and an `answer` (a string, or a number, which is turned into a string).
An `id` field is used if present, else `<file stem>-<row index>`. Every other
column (id included) is kept in `Problem.extra` and reaches user reward
functions as keyword arguments (docs/rewards.md). Blank lines in a `.jsonl`
file are skipped.

Every problem with a file raises `DataError` with a one-line message naming the
file, the 1-based line (`.jsonl`) or row (`.parquet`) and what is wrong:

    data/train.jsonl:7: missing field 'answer' (have: prompt, solution)

Simplifications: the whole file is read into memory; no compressed files, no
CSV, no nested fields; the question is used as-is (no chat markup: see
`prompts.py`).

Try it:
    from tokencredit.data import load_problems
    load_problems("../shared/data/benchmarks/math500.jsonl", limit=3)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class Problem:
    """One question with its verifiable answer; `prompt` has no chat markup.
    `extra`: the data file's other columns (name -> value), for reward functions."""

    prompt: str
    answer: str
    id: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


class DataError(ValueError):
    """A data file is missing or malformed; the message names file and line."""


PROMPT_FIELDS = ("prompt", "problem")  # tried in this order when prompt_field is None


def load_problems(
    path: str | Path,
    prompt_field: str | None = None,
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Problem]:
    """Read problems from a `.jsonl` or `.parquet` file (at most `limit` of them)."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, limit)
    else:
        raise DataError(f"{path}: unknown extension '{path.suffix}' (expected .jsonl or .parquet)")
    problems: list[Problem] = []
    for index, (where, row) in enumerate(rows):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_row_to_problem(row, where, index, path.stem, prompt_field, answer_field))
    if not problems and limit != 0:
        raise DataError(f"{path}: no rows (empty file)")
    return problems


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, parsed object) per non-blank line; location is `file:line`."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _parquet_rows(path: Path, limit: int | None) -> Iterator[tuple[str, Any]]:
    """(location, row dict) per row; location is `file: row N`."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot read parquet ({first})") from None
    if limit is not None:
        table = table.slice(0, limit)
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}: row {i}", row


def _row_to_problem(
    row: Any, where: str, index: int, stem: str, prompt_field: str | None, answer_field: str
) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    field = prompt_field or next((f for f in PROMPT_FIELDS if f in row), None)
    if field is None or field not in row:
        wanted = f"'{prompt_field}'" if prompt_field else "'prompt' or 'problem'"
        raise DataError(f"{where}: missing field {wanted} (have: {_keys(row)})")
    if answer_field not in row:
        raise DataError(f"{where}: missing field '{answer_field}' (have: {_keys(row)})")
    prompt = row[field]
    if prompt is None:
        raise DataError(f"{where}: empty field '{field}'")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(prompt).__name__}")
    answer = _answer_text(row[answer_field], where, answer_field)
    if not prompt.strip():
        raise DataError(f"{where}: empty field '{field}'")
    if not answer.strip():
        raise DataError(f"{where}: empty field '{answer_field}'")
    pid = row.get("id")
    pid = str(pid) if isinstance(pid, (str, int)) and not isinstance(pid, bool) and str(pid) else f"{stem}-{index}"
    extra = {k: v for k, v in row.items() if k not in (field, answer_field)}
    return Problem(prompt=prompt, answer=answer.strip(), id=pid, extra=extra)


def _answer_text(value: Any, where: str, name: str) -> str:
    if value is None:
        raise DataError(f"{where}: empty field '{name}'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field '{name}' must be a string or a number, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _keys(row: dict) -> str:
    keys = ", ".join(str(k) for k in list(row)[:20])
    return keys or "no fields"
