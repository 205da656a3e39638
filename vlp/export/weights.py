"""safetensors writing: dtype casting and sharding (huggingface_hub's `save_torch_state_dict`)."""
from __future__ import annotations

import os
from typing import Dict, List

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ONE_FILE = 2**62  # a shard size no model reaches: formats whose loaders read a single file


def cast(sd: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (fp32 | bf16 | fp16); integer buffers keep theirs."""
    target = DTYPES[dtype]
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def save_state_dict(sd: Dict[str, torch.Tensor], out_dir: str, stem: str = "model",
                    max_shard_size="5GB") -> List[str]:
    """`stem.safetensors`, or `stem-0000i-of-0000n.safetensors` + `stem.safetensors.index.json` above
    `max_shard_size`; returns the file names written. Tensors sharing memory are cloned apart first."""
    from huggingface_hub import save_torch_state_dict

    seen, clean = set(), {}
    for k, v in sd.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        clean[k] = v.clone() if ptr is not None and ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    before = set(os.listdir(out_dir))
    save_torch_state_dict(clean, out_dir, filename_pattern=stem + "{suffix}.safetensors",
                          max_shard_size=max_shard_size, force_contiguous=True)
    return sorted(set(os.listdir(out_dir)) - before)


__all__ = ["DTYPES", "ONE_FILE", "cast", "save_state_dict"]
