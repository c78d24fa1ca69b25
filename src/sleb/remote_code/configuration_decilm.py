"""The DeciLM / Nemotron-NAS config, as written by sleb (https://github.com/ for sleb: src/sleb/remote_code).

A Llama-family model whose layers may lack their attention or their MLP: `block_configs[i]` says, for
layer i, `attention.no_op` (no attention and no input norm: the layer holds no KV cache) and
`ffn.no_op` (no MLP and no post-attention norm), with `attention.n_heads_in_group` (query heads per
key/value head) and `ffn.ffn_mult` (intermediate size = find_multiple(int(2 * ffn_mult * hidden / 3), 256)).
vLLM, SGLang and MLX read this layout natively (architecture `DeciLMForCausalLM`).
"""

from transformers import LlamaConfig


class BlockFields(dict):
    """A dict whose keys also read as attributes: vLLM reads `block_configs[i].attention.no_op`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


def _fields(value):
    if isinstance(value, dict):
        return BlockFields({k: _fields(v) for k, v in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_fields(entry) for entry in (block_configs or [])]

    def to_dict(self):
        """transformers 5 keeps the rotary settings in `rope_parameters`; the runtimes that load this layout
        natively (MLX's and vLLM's nemotron-nas) read the top-level `rope_theta` and `rope_scaling` that
        Nemotron-NAS checkpoints carry, and MLX silently takes its own default base without them."""
        out = super().to_dict()
        rope = dict(out.get("rope_parameters") or {})
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        out["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
        return out
