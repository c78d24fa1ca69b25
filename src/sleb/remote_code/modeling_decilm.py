"""DeciLM / Nemotron-NAS layers for transformers, as written by sleb: Llama layers whose attention or MLP
may be absent (see configuration_decilm.py). Builds on transformers' Llama classes; a layer without
attention is `h = x`, then `h + mlp(norm(h))`; a layer without MLP is `x + attn(norm(x))`.

Attention modules are numbered over the layers that have attention, so the KV cache holds one entry
per attention layer and its first entry is a real one.
"""

import copy

from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from .configuration_decilm import DeciLMConfig


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def _layer_config(config, index):
    entry = config.block_configs[index]
    layer = copy.copy(config)
    attention, ffn = entry["attention"], entry["ffn"]
    if not attention["no_op"]:
        layer.num_key_value_heads = config.num_attention_heads // attention["n_heads_in_group"]
    if not ffn["no_op"]:
        layer.intermediate_size = ffn_mult_to_intermediate_size(ffn["ffn_mult"], config.hidden_size)
    return layer


class DeciLMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx, cache_index):
        layer = _layer_config(config, layer_idx)
        super().__init__(layer, cache_index)
        entry = config.block_configs[layer_idx]
        self.has_attention = not entry["attention"]["no_op"]
        self.has_mlp = not entry["ffn"]["no_op"]
        if not self.has_attention:
            del self.self_attn, self.input_layernorm
        if not self.has_mlp:
            del self.mlp, self.post_attention_layernorm

    def forward(self, hidden_states, **kwargs):
        if self.has_attention:
            residual = hidden_states
            attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
            hidden_states = residual + attended
        if self.has_mlp:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMModel(LlamaModel):
    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        layers, attention_layers = [], 0
        for index in range(config.num_hidden_layers):
            layers.append(DeciLMDecoderLayer(config, index, attention_layers))
            attention_layers += int(layers[-1].has_attention)
        self.layers = nn.ModuleList(layers)
        self.post_init()


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.post_init()
