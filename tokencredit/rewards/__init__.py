"""Verifiable rewards: math answers checked with math-verify (see `math.py`)."""

from tokencredit.rewards.math import MathVerifier, extract_answer, score

__all__ = ["MathVerifier", "extract_answer", "score"]
