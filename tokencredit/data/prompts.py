"""Chat prompts: a question (plain text) -> chat messages -> the model's prompt string.

`build_messages` makes the role/content list every chat template takes;
`render_prompt` applies the tokenizer's own chat template with
`add_generation_prompt=True`, so the string ends where the assistant's answer
starts. The question text itself (e.g. `Problem.prompt`) carries the
instruction to box the final answer; no system prompt is added unless given
(a template may still insert its own default, as SmolLM2's does).

Simplifications: single-turn only; no few-shot examples.

Try it:
    from tokencredit.model.tiny import build_tiny_tokenizer
    from tokencredit.data import render_prompt
    print(render_prompt(build_tiny_tokenizer(), "Compute 2 + 3."))
"""

from __future__ import annotations

from typing import Any


def build_messages(question: str, system: str | None = None) -> list[dict[str, str]]:
    """`[{"role": "system", ...}?, {"role": "user", "content": question}]`."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return messages


def render_prompt(tokenizer: Any, question: str, system: str | None = None) -> str:
    """The prompt text the model continues: the chat template applied, untokenized."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template "
            "or use an instruct model's tokenizer"
        )
    return tokenizer.apply_chat_template(
        build_messages(question, system), tokenize=False, add_generation_prompt=True
    )
