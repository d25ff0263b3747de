"""Problems for RL and evaluation: the built-in arithmetic task, .jsonl/.parquet
files, and chat prompt rendering."""

from tokencredit.data.arithmetic import arithmetic_problems
from tokencredit.data.files import DataError, Problem, load_problems
from tokencredit.data.prompts import build_messages, render_prompt

__all__ = ["DataError", "Problem", "arithmetic_problems", "build_messages", "load_problems", "render_prompt"]
