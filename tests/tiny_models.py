"""Tiny random-weight Llama models and word-level tokenizers for fast tests (no downloads)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast


def tiny_tokenizer(words: int = 250, prefix: str = "w") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: <unk>, <s>, </s> and `words` words `{prefix}0`..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"{prefix}{i}": i + 3 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(vocab_size: int = 256, layers: int = 4, context: int = 256) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=context,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,  # no pad id: it would zero <unk>'s embedding
    )


def tiny_model(config: LlamaConfig | None = None, seed: int = 0):
    """A random-weight Llama in eval mode (its own copy of the config: remove_blocks edits it)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config or tiny_config())).eval()


def save_tiny(folder, layers: int = 4, seed: int = 0) -> str:
    """Write a tiny fp32 checkpoint with its tokenizer to `folder`."""
    model = tiny_model(tiny_config(layers=layers), seed=seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)
