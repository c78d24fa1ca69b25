"""A cheap identity of a model, so a saved search is only ever applied to the model it was made on.

Recorded in checkpoints (resuming another model's search is refused) and in run reports
(`--from-report` checks it). It combines a hash of the decoder config (without fields that name a
file, a dtype or a library version) with each block's parameter count, a checksum of its weights
(the sum of |w| over the first 256 entries of every parameter) and a sample of its first weights.
Both survive a change of dtype, so a report made in bfloat16 applies to the same model loaded in
float32; the sample is what tells apart two models drawn from the same distribution (whose
checksums agree to a fraction of a percent), by the cosine between the two samples.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .arch import find_blocks, text_config
from .sizes import block_params

# Config fields that change with how a model was loaded or saved, not with what it is.
_VOLATILE = ("dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures",
             "quantization_config", "_attn_implementation", "_attn_implementation_autoset", "use_cache")


def config_sha256(model) -> str:
    fields = {k: v for k, v in text_config(model).to_dict().items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


SAMPLE = 32  # weights sampled per block


def model_fingerprint(model) -> dict:
    from accelerate.utils import align_module_device

    sums, samples = [], []
    for block in find_blocks(model).modules:
        total, first = 0.0, []
        # Module by module, in parameters() order: weights offloaded to disk are brought in one
        # module at a time for the look (accelerate hooks the leaf modules).
        for module in block.modules():
            with align_module_device(module):
                for p in module.parameters(recurse=False):
                    total += p.detach().reshape(-1)[:256].double().abs().sum().item()
                    if p.dim() > 1 and sum(len(x) for x in first) < SAMPLE:
                        first.append(p.detach().reshape(-1)[:SAMPLE].double().cpu())
        sums.append(total)
        sample = torch.cat(first) if first else torch.zeros(1, dtype=torch.float64)
        samples.append([round(v, 6) for v in sample[:SAMPLE].tolist()])
    return {"config_sha256": config_sha256(model), "blocks": len(sums), "block_params": block_params(model),
            "block_checksums": sums, "block_samples": samples}


def same_model(a: dict, b: dict) -> bool:
    """Whether two fingerprints describe the same weights (older ones without a config hash compare blocks only)."""
    if a.get("blocks") != b.get("blocks") or a.get("block_params") != b.get("block_params"):
        return False
    if "config_sha256" in a and "config_sha256" in b and a["config_sha256"] != b["config_sha256"]:
        return False
    x, y = torch.tensor(a["block_checksums"]), torch.tensor(b["block_checksums"])
    if not torch.allclose(x, y, rtol=1e-2, atol=1e-6):
        return False
    if "block_samples" in a and "block_samples" in b:
        for u, v in zip(a["block_samples"], b["block_samples"]):
            u, v = torch.tensor(u, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
            if u.shape != v.shape or torch.nn.functional.cosine_similarity(u, v, dim=0) < 0.99:
                return False
    return True
