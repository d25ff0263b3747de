"""Tiny, randomly initialised Llama-architecture models with a locally built
character-level tokenizer. Nothing is downloaded.

Used by the tests (fast on 2 CPU cores), by benchmarks that need a "tiny random
model" row, and by the `tiny-random` model alias (handy for smoke-testing a
config end to end in seconds). The tokenizer speaks the same chat markup as
SmolLM2 (`<|im_start|>` / `<|im_end|>`), so prompts and EOS handling follow the
same code path as the real model.

Try it:
    from tokencredit.model.tiny import build_tiny
    model, tok = build_tiny(seed=0)
"""

from __future__ import annotations

import string

import torch

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
# printable ASCII minus the vertical-whitespace we map separately
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """Character-level `PreTrainedTokenizerFast` with chat markup specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_config(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, tie: bool = True):
    """(model, tokenizer): a randomly initialised LlamaForCausalLM in float32, eval mode."""
    from transformers import LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = tiny_config(len(tok), hidden=hidden, layers=layers, heads=heads, tie=tie)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    return model, tok
