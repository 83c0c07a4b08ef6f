"""vLLM general plugin: correct multi-LoRA batches on the CPU backend.

The PyTorch LoRA ops that vLLM's CPU backend uses (``vllm/lora/ops/torch_ops/lora_ops.py``:
``bgmv_shrink``, ``bgmv_expand``, ``bgmv_expand_slice``) gather each token's adapter
weights with the per-token LoRA index. A token without an adapter has index -1, which
Python indexing reads as *the last slot*: in a batch that mixes base-model and LoRA
requests the base rows silently receive an adapter's delta. Upstream fixes are open
(vllm PRs #48421 and #49656); the GPU kernels skip index -1 and are not affected.

The replacements here mask rows with a negative index so they get no LoRA delta,
exactly as the GPU kernels do. vLLM runs general plugins (entry-point group
``vllm.general_plugins``, declared in ``pyproject.toml``) in every process it starts,
so the EngineCore and worker processes are patched too, not only the replica.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Modules that hold their own references to the three ops (``from ... import``).
_PATCHED_MODULES = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)


def _gather_lora_delta(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``inputs @ weights[index].T``, zero for rows whose index is negative.

    Returns:
        The per-row products and the boolean mask of rows that have an adapter.

    """
    import torch

    has_lora = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)
    return outputs * has_lora.unsqueeze(-1).to(dtype), has_lora


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """LoRA A projection per token; rows without an adapter get zeros."""
    outputs, _ = _gather_lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """LoRA B projection per token; rows without an adapter are left as they are."""
    import torch

    outputs, has_lora = _gather_lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1  # upstream broadcasts a single row; kept identical
    # The adapter and the model may pad the output dimension differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        keep = ~has_lora[:limit].unsqueeze(-1)
        output_tensor[:, :common] = torch.where(keep, output_tensor[:, :common], outputs[:limit, :common])


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """LoRA B projection into one output slice; rows without an adapter are left as they are."""
    import torch

    outputs, has_lora = _gather_lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    window = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs:
        window += outputs
    else:
        window.copy_(torch.where(~has_lora.unsqueeze(-1), window, outputs))


REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def register() -> None:
    """Entry point of the plugin: swap the three ops wherever vLLM references them.

    Safe to call many times and in processes that never use LoRA. The ``sgmv_*`` ops
    call the ``bgmv_*`` ones through their module's globals, so they are fixed too.
    """
    for name in _PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a vLLM build without the torch ops (e.g. no LoRA support)
            continue
        for attr, replacement in REPLACEMENTS.items():
            if hasattr(module, attr):
                setattr(module, attr, replacement)
    logger.debug("cpu_lora_fix: patched %s", ", ".join(REPLACEMENTS))
