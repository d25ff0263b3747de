"""Run-directory I/O: the one place that writes and reads the JSONL and parquet
files of a run (metrics.jsonl, probes/*.jsonl, probes/*.parquet).

JSON has no NaN or infinity: non-finite floats are written as null (also
inside lists and nested dicts). A JSONL file is appended line by line, so a
killed process leaves at most one torn last line; `read_jsonl` skips it (with a
warning) and `read_jsonl(..., repair=True)` also cuts it from the file, so
appending continues cleanly. Parquet files are written to a temporary name and
renamed: a reader never sees half a file.

Try it:
    append_jsonl(run / "metrics.jsonl", [{"step": 1, "x": float("nan")}])
    read_jsonl(run / "metrics.jsonl")  # [{"step": 1, "x": None}]
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("tokencredit")


def json_safe(v: Any) -> Any:
    """`v` with every non-finite float replaced by None (lists, tuples, dicts recursively)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    return v


def _line(row: dict) -> str:
    return json.dumps(json_safe(row)) + "\n"


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append one JSON line per row (flushed), creating the file and its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(_line(r))
        f.flush()


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Replace `path` by the rows, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(_line(r) for r in rows))
    os.replace(tmp, path)


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """The JSON objects of `path`, one per line; blank lines and a malformed line
    (the torn tail of a killed writer) are skipped with a warning. repair: also
    rewrite the file without them. A missing file reads as []."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, bad = [], 0
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON, skipped", path, i + 1)
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    if repair and bad:
        write_jsonl(path, rows)
    return rows


def write_parquet(path: str | Path, cols: dict[str, list]) -> Path:
    """Columns -> `path` (.parquet), written to a temporary file and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)
    return path


def read_parquet(path: str | Path) -> dict[str, list]:
    """Columns of a parquet file."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(path)).to_pydict()


def read_table(path: str | Path) -> list[dict]:
    """Rows of a .parquet or .jsonl file as dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl(path)
