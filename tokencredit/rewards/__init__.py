"""Verifiable rewards: math answers checked with math-verify (see `math.py`), and
the run's reward functions, built-in or user-supplied, combined (`functions.py`)."""

from tokencredit.rewards.functions import RewardFunctions
from tokencredit.rewards.math import MathVerifier, extract_answer, score

__all__ = ["MathVerifier", "RewardFunctions", "extract_answer", "score"]
