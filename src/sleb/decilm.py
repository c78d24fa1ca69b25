"""Sublayer results saved in the DeciLM / Nemotron-NAS layout, which serving runtimes load natively.

A model whose blocks lost their attention or MLP branch is no longer a vanilla checkpoint of its
family: a Llama config cannot say that layer 7 has no attention. NVIDIA's Nemotron-NAS models
(architecture `DeciLMForCausalLM`, `model_type` `nemotron-nas`) can: `block_configs[i]` holds
`attention.no_op` and `ffn.no_op` per layer, and vLLM, SGLang and MLX load that layout natively (a
layer without attention holds no KV cache there). transformers has no class for it, so the folder
also gets `configuration_decilm.py` and `modeling_decilm.py` (sleb's own code, `sleb/remote_code`,
built on transformers' Llama classes) and loads with `trust_remote_code=True`.

The layout is Llama's (RMSNorm, rotary attention, SwiGLU MLP, no biases), so only models whose
blocks have exactly Llama's weights qualify; `check_decilm_source` proves it before the search by
running the source's first block both ways. The save (`DeciLMFolder`) is every format's
(`sleb.writer.save_with`): a temporary folder, reloaded (with the remote code) and compared with the
in-memory model before it is moved into place.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from . import export
from .arch import Branches, ZeroBranch, find_blocks, input_device, text_config
from .errors import BadInput, CheckFailed
from .sizes import weight_bytes
from .units import model_branches, pruned_view
from .writer import SaveJob, Writer, save_with

REMOTE_CODE = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
LLAMA_BLOCK_WEIGHTS = {
    "attn": {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
             "self_attn.v_proj.weight", "self_attn.o_proj.weight"},
    "mlp": {"post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"},
}
# Config fields of the source that are not the new model's.
DROPPED_CONFIG = ("architectures", "model_type", "auto_map", "transformers_version", "num_hidden_layers",
                  "layer_types", "dtype", "torch_dtype", "_name_or_path")


def ffn_mult(intermediate: int, hidden: int) -> float:
    """The `ffn_mult` whose DeciLM intermediate size (find_multiple(int(2 * ffn_mult * hidden / 3), 256)) is
    `intermediate`; BadInput when none is (an intermediate size that is not a multiple of 256)."""
    from .remote_code.modeling_decilm import ffn_mult_to_intermediate_size

    mult = intermediate * 3 / (2 * hidden)
    if ffn_mult_to_intermediate_size(mult, hidden) != intermediate:
        raise BadInput(f"the DeciLM layout cannot state an MLP of {intermediate} (hidden size {hidden}): its "
                       "intermediate sizes are multiples of 256; use --unit block")
    return mult


def _decilm_classes():
    from .remote_code.configuration_decilm import DeciLMConfig
    from .remote_code.modeling_decilm import DeciLMForCausalLM

    return DeciLMConfig, DeciLMForCausalLM


def decilm_config(model, layers: list[tuple[bool, bool]]):
    """The DeciLM config of `model` (a Llama-layout model) with `layers[i]` = (has attention, has MLP)."""
    DeciLMConfig, _ = _decilm_classes()
    cfg = text_config(model)
    fields = {k: v for k, v in cfg.to_dict().items() if k not in DROPPED_CONFIG}
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    mult = ffn_mult(cfg.intermediate_size, cfg.hidden_size)
    blocks = [{"attention": {"no_op": not attn, "replace_with_linear": False,
                             "n_heads_in_group": None if not attn else heads // kv},
               "ffn": {"no_op": not mlp, "replace_with_linear": False, "ffn_mult": None if not mlp else mult}}
              for attn, mlp in layers]
    config = DeciLMConfig(block_configs=blocks, num_hidden_layers=len(layers), **fields)
    config.architectures = ["DeciLMForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    return config


def _block_weights(block) -> set[str]:
    return {name for name, _ in block.named_parameters()}


@torch.no_grad()
def check_decilm_source(model, branches: Branches, family: str | None = None, unit: str = "sublayer") -> None:
    """Refuse, before the search, a model the DeciLM layout cannot hold (BadInput, one line): its blocks must
    have exactly Llama's weights, its config no sliding window, and its first block run as a DeciLM layer
    must give the same logits (so norms, activation, rotary and biases are Llama's). `unit`: the --unit
    asked for, named in the message."""
    cfg = text_config(model)
    family = family or getattr(cfg, "model_type", type(model).__name__)
    blocks = find_blocks(model).modules
    want = LLAMA_BLOCK_WEIGHTS["attn"] | LLAMA_BLOCK_WEIGHTS["mlp"]
    have = _block_weights(blocks[0])
    if (branches.attn, branches.mlp) != ("self_attn", "mlp") or have != want:
        extra = sorted(have - want)[:3] or sorted(want - have)[:3]
        raise BadInput(f"--unit {unit} results are saved in the DeciLM (Nemotron-NAS) layout, which holds Llama-shaped "
                       f"blocks; {family}'s blocks differ ({', '.join(extra)}); use --unit block")
    window = getattr(cfg, "sliding_window", None)
    if window and window < (getattr(cfg, "max_position_embeddings", None) or window + 1) and \
            getattr(cfg, "use_sliding_window", True):
        raise BadInput(f"{family} uses sliding-window attention ({window} tokens), which the DeciLM layout does not "
                       "state; use --unit block")
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise BadInput(f"{family}'s attention heads are {head_dim} wide, not hidden size / heads; the runtimes that "
                       "load the DeciLM layout natively (MLX) take the head size from those, so they would run it "
                       "wrongly; use --unit block")
    ffn_mult(cfg.intermediate_size, cfg.hidden_size)
    # One layer both ways: the source with only its first block, and a one-layer DeciLM model on its weights.

    _, DeciLMForCausalLM = _decilm_classes()
    one = _decilm_model(model, [(True, True)], {0: 0}, DeciLMForCausalLM)
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(16) * 7919 % vocab)[None].to(input_device(model))
    with pruned_view(model, list(range(1, len(blocks)))):
        expected = model(input_ids=ids, use_cache=False).logits.float()
    got = one(input_ids=ids, use_cache=False).logits.float()
    tol = (1e-4 if model.dtype == torch.float32 else 2e-2) * max(1.0, expected.abs().max().item())
    if not (got - expected).abs().max().item() <= tol:
        raise BadInput(f"{family} computes its blocks differently from Llama (norms, activation, rotary or "
                       "embedding scale), so the DeciLM layout cannot hold it; use --unit block")


def _decilm_model(model, layers, source_of: dict[int, int], model_class):
    """A DeciLM model sharing `model`'s tensors: new layer j is source block `source_of[j]` (its kept parts)."""
    config = decilm_config(model, layers)
    config.dtype = model.dtype
    with torch.device("meta"):
        new = model_class(config)
    blocks = find_blocks(model)
    prefix = blocks.path + "."
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not name.startswith(prefix):
            state[name] = tensor
            continue
        index, _, rest = name[len(prefix):].partition(".")
        for j, i in source_of.items():
            if int(index) == i:
                attn, mlp = layers[j]
                keep = (attn and rest in LLAMA_BLOCK_WEIGHTS["attn"]) or (mlp and rest in LLAMA_BLOCK_WEIGHTS["mlp"])
                if keep:
                    state[f"{prefix}{j}.{rest}"] = tensor
    expected = set(new.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckFailed(f"the DeciLM layout does not match the model's weights (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    new.load_state_dict({k: v.detach() for k, v in state.items()}, assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    # Buffers (rotary tables) are not in the state dict: take the source's, which live at the same names.
    source_buffers = dict(model.named_buffers())
    for name, buffer in list(new.named_buffers()):
        if buffer.is_meta:
            if name not in source_buffers:
                raise CheckFailed(f"the DeciLM model has a buffer {name} that the source model lacks")
            owner, _, attr = name.rpartition(".")
            setattr(new.get_submodule(owner), attr, source_buffers[name])
    for name, module in new.named_modules():
        if hasattr(module, "original_inv_freq") and getattr(module.original_inv_freq, "is_meta", False):
            module.original_inv_freq = module.inv_freq
    return new.eval()


def to_decilm(model, branches: Branches):
    """The DeciLM model of `model` after `sleb.units.remove_units` (its skipped branches are zero stand-ins),
    sharing its tensors; blocks that lost both branches are already gone."""
    _, DeciLMForCausalLM = _decilm_classes()
    layers = []
    for block in find_blocks(model).modules:
        layers.append((not isinstance(getattr(block, branches.attn), ZeroBranch),
                       not isinstance(getattr(block, branches.mlp), ZeroBranch)))
    return _decilm_model(model, layers, {j: j for j in range(len(layers))}, DeciLMForCausalLM)


def write_remote_code(folder: str | os.PathLike) -> None:
    here = Path(__file__).parent / "remote_code"
    for name in REMOTE_CODE:
        shutil.copyfile(here / name, Path(folder) / name)


@dataclass
class DeciLMFolder(Writer):
    """A branch-unit result (after `sleb.units.remove_units`) as a DeciLM folder with its model code,
    reloaded with `trust_remote_code=True` and compared with the in-memory model."""

    name: ClassVar[str] = "decilm-folder"

    unit: str = "sublayer"  # the --unit asked for, named in refusals
    branches: Branches | None = None  # the model's branches, found before the removal (`check_model`)

    def check_model(self, model, tokenizer) -> None:
        self.branches = model_branches(model)  # proven skippable, before the search
        check_decilm_source(model, self.branches, unit=self.unit)

    def size(self, model) -> int:
        return weight_bytes(model)

    def prepare(self, job: SaveJob) -> None:
        if self.branches is None:  # after the removal they can no longer be found: a removed branch is a stand-in
            raise CheckFailed("the DeciLM writer needs the model's branches, found before the removal (check_model)")
        job.saved = to_decilm(job.model, self.branches)

    def write(self, job: SaveJob, tmp: Path) -> dict:
        job.saved.save_pretrained(tmp)
        write_remote_code(tmp)
        job.tokenizer.save_pretrained(tmp)
        return {}

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        return {"reload_max_logit_diff": export.verify_reload(job.model, job.tokenizer, tmp, trust_remote_code=True,
                                                              what="saved DeciLM model")}


def save_decilm(model, tokenizer, out_dir: str | os.PathLike, result, branches: Branches, *, overwrite: bool = False,
                report: dict | None = None, inputs=()) -> Path:
    """Write `model` (after `sleb.units.remove_units`) as a DeciLM folder with its model code and
    `sleb_report.json`; reloaded with `trust_remote_code=True` and compared with the in-memory model on a
    probe before it is moved into place (`DeciLMFolder`; the output policy is every folder output's)."""
    save_with(DeciLMFolder(branches=branches), model, tokenizer, out_dir, result, report=report,
              overwrite=overwrite, inputs=inputs)
    return Path(out_dir)
