"""Shared fixtures: tiny random-weight models of many families, a small tokenizer, the offline model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

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


def tiny_config(model_type: str, layers: int = LAYERS, **extra):
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


def tiny_model(model_type: str, layers: int = LAYERS, seed: int = 0, **extra):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers, **extra), attn_implementation="eager")
    # Random init leaves most blocks nearly identical in effect; scale weights up so losses differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def random_windows(n: int = 3, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer (vocab VOCAB) trained on offline news text, with a BOS it adds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sleb.data import documents

    docs, _ = documents("gensim-lee", "train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs[:50], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


@pytest.fixture(scope="session")
def smollm2():
    """The real offline model (SmolLM2-135M-Instruct, fp32 on CPU) and its tokenizer."""
    import sleb

    return sleb.load("smollm2-135m", dtype="float32", device="cpu")
