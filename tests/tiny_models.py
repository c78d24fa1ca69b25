"""Tiny random-weight models and tokenizers for fast tests (no downloads), in one place.

* `tiny_config` / `tiny_model` / `save_tiny`: a small Llama, the default test model;
* `family_config` / `family_model`: one tiny model per family (`FAMILIES`), for architecture coverage;
* `tiny_tokenizer`: a word-level tokenizer (`w0`, `w1`, ...); `random_windows`: token id windows.
"""

from __future__ import annotations

import copy

import torch
import pytest  # noqa: F401  (keeps this a test helper module)
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast


def tiny_tokenizer(words: int = 250, prefix: str = "w") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: <unk>, <s>, </s> and `words` words `{prefix}0`..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"{prefix}{i}": i + 3 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(vocab_size: int = 256, layers: int = 4, context: int = 256, *, hidden: int = 64,
                initializer_range: float = 0.02, tie: bool = False, bos: int | None = 1,
                eos: int | None = 2, intermediate: int | None = None) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=context,
        initializer_range=initializer_range, bos_token_id=bos, eos_token_id=eos,
        tie_word_embeddings=tie,  # no pad id: it would zero <unk>'s embedding
    )


def tiny_model(config: LlamaConfig | None = None, seed: int = 0):
    """A random-weight Llama in eval mode (its own copy of the config: remove_blocks edits it)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config or tiny_config())).eval()


def save_tiny(folder, layers: int = 4, seed: int = 0, tokenizer=None, **config) -> str:
    """Write a tiny fp32 checkpoint with its tokenizer (default: `tiny_tokenizer()`) to `folder`."""
    tokenizer = tokenizer or tiny_tokenizer()
    config.setdefault("vocab_size", max(256, len(tokenizer)))
    model = tiny_model(tiny_config(layers=layers, **config), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


VOCAB = 320
LAYERS = 5

# model_type -> extra config fields for a tiny model. Families with per-layer config fields
# (layer_types) and with tuple-returning or positionally called blocks are all here.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    "qwen3": {},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 8, "sliding_window_pattern": 2},
    "phi3": {"pad_token_id": 0},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 16, "max_position_embeddings": 64},
    "gpt2": {"n_positions": 64},
    "gpt_neox": {},
}
# Families the core issue does not name, for the export test.
UNNAMED_FAMILIES = {"olmo2": {}, "granite": {}, "stablelm": {}}


def family_config(model_type: str, layers: int = LAYERS, **extra):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    fields.update(FAMILIES.get(model_type, {}))
    fields.update(UNNAMED_FAMILIES.get(model_type, {}))
    fields.update(extra)
    if model_type in ("gpt2", "opt"):
        fields.pop("num_key_value_heads")
    return AutoConfig.for_model(model_type, **fields)


def family_model(model_type: str, layers: int = LAYERS, seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, layers, **extra), attn_implementation="eager")
    # Random init leaves most blocks nearly identical in effect; scale weights up so losses differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def random_windows(n: int = 3, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)

