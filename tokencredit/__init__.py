"""tokencredit: critic-free RL for language models with verifiable rewards, built
around token-level credit (see README.md and shared METHODS.md)."""

__version__ = "0.1.0"
