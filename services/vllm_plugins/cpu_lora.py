"""vLLM general plugin: correct and fast multi-LoRA ops on the CPU backend.

vLLM's CPU backend runs LoRA through PyTorch ops (``vllm/lora/ops/torch_ops/lora_ops.py``:
``bgmv_shrink``, ``bgmv_expand``, ``bgmv_expand_slice``; the ``sgmv_*`` prefill variants
call them per token). They have two problems, both fixed here:

* **Wrong output in mixed batches.** They gather each token's adapter weights with the
  per-token LoRA index, and a token without an adapter has index -1, which Python
  indexing reads as *the last slot*: base-model rows batched with LoRA rows silently get
  an adapter's delta (upstream fixes are open: vllm PRs #48421 and #49656; the GPU kernels
  skip -1 and are not affected).
* **Slow.** The gather copies a full ``rank x hidden`` weight matrix per token and layer
  before a batched ``einsum``: with every request on one r=8 adapter the 0.5B dev model ran
  at 0.40x its base throughput on our dev box (vLLM reports about 0.66x on GPU, vllm PR
  #11267).

The replacements group the tokens by adapter and run one matrix multiply per adapter
present in the batch (one plain ``x @ W.T`` when all rows share an adapter); rows with
index -1 are left untouched, as the GPU kernels leave them. vLLM runs general plugins
(entry-point group ``vllm.general_plugins``, declared in ``pyproject.toml``) in every
process it starts, so the EngineCore and worker processes are patched too. Only the CPU
platform is patched.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
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


#: The indices :func:`adapter_rows` grouped last, and its answer.
_last_grouping: tuple[torch.Tensor, list[tuple[int, torch.Tensor | None]]] | None = None


def adapter_rows(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """Group token rows by adapter slot.

    Args:
        indices: Per-token adapter slot; -1 for tokens without an adapter.

    Returns:
        ``(slot, rows)`` for each slot present, ascending; ``rows`` is ``None`` when every
        row uses that slot (the common case: one brand's traffic), else the row numbers.
        Rows with a negative index belong to no group.

    """
    import torch

    global _last_grouping
    # Every LoRA layer of a step asks about the same indices (a dozen calls per layer): reuse
    # the last answer when the contents match. Compared by value, as a new tensor can reuse
    # the address of an old one.
    if _last_grouping is not None:
        previous, groups = _last_grouping
        if previous.shape == indices.shape and torch.equal(previous, indices):
            return groups
    groups = _group_rows(indices)
    _last_grouping = (indices.clone(), groups)
    return groups


def _group_rows(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    import torch

    if indices.numel() == 0:
        return []
    low, high = int(indices.min()), int(indices.max())
    if low == high:
        return [] if low < 0 else [(low, None)]
    groups: list[tuple[int, torch.Tensor | None]] = []
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            groups.append((int(slot), torch.nonzero(indices == slot).squeeze(1)))
    return groups


def _matrices(weights: torch.Tensor) -> torch.Tensor:
    """The stack as ``(slots, out, in)``: vLLM keeps a singleton layer axis at dim 1."""
    return weights.squeeze(dim=1) if weights.dim() == 4 else weights


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """``output[:, :rank] = scaling * inputs @ A[slot].T`` per row; rows without an adapter get zeros."""
    weights = _matrices(lora_a_weights)
    dtype = output_tensor.dtype
    out = output_tensor[:, : weights.shape[1]]
    groups = adapter_rows(lora_indices_tensor)
    if len(groups) == 1 and groups[0][1] is None:
        out.copy_(inputs.to(dtype) @ weights[groups[0][0]].to(dtype).T).mul_(scaling)
        return
    out.zero_()
    for slot, rows in groups:
        assert rows is not None
        product = inputs.index_select(0, rows).to(dtype) @ weights[slot].to(dtype).T
        out.index_copy_(0, rows, product.mul_(scaling))


def _expand_into(
    target: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, add_inputs: bool
) -> None:
    """``target (+)= inputs @ B[slot].T`` per row (``weights`` already cut to ``target``'s width)."""
    dtype = target.dtype
    for slot, rows in adapter_rows(indices):
        matrix = weights[slot].to(dtype).T
        if rows is None:
            product = inputs.to(dtype) @ matrix
            if add_inputs:
                target.add_(product)
            else:
                target.copy_(product)
        else:
            product = inputs.index_select(0, rows).to(dtype) @ matrix
            if add_inputs:
                target.index_add_(0, rows, product)
            else:
                target.index_copy_(0, rows, product)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """``output (+)= inputs @ B[slot].T`` per row; rows without an adapter are left as they are."""
    weights = _matrices(lora_b_weights)
    if inputs.shape[0] != output_tensor.shape[0]:
        _masked_expand(inputs, weights, output_tensor, lora_indices_tensor, add_inputs)
        return
    # The adapter and the model may pad the output dimension differently.
    common = min(weights.shape[1], output_tensor.shape[1])
    _expand_into(output_tensor[:, :common], inputs, weights[:, :common], lora_indices_tensor, add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """``output[:, offset:offset+size] (+)= inputs @ B[slot].T`` per row; rows without an adapter untouched."""
    window = output_tensor[:, slice_offset : slice_offset + slice_size]
    _expand_into(window, inputs, _matrices(lora_b_weights), lora_indices_tensor, add_inputs)


def _masked_expand(
    inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor, add_inputs: bool
) -> None:
    """Upstream's per-token gather with index -1 masked, for its odd case of row counts that differ.

    Upstream broadcasts a single input row over a taller output; kept exactly so.
    """
    import torch

    dtype = output.dtype
    has_lora = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected) * has_lora.unsqueeze(-1).to(dtype)
    limit = 1 if outputs.shape[0] == 1 and output.shape[0] != 1 else output.shape[0]
    common = min(outputs.shape[1], output.shape[1])
    if add_inputs:
        output[:, :common] += outputs[:limit, :common]
    else:
        keep = ~has_lora[:limit].unsqueeze(-1)
        output[:, :common] = torch.where(keep, output[:, :common], outputs[:limit, :common])


REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}

#: vLLM's own ops as found before patching (the benchmarks compare against them).
STOCK: dict[str, object] = {}


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def install(ops: Mapping[str, object]) -> None:
    """Put ``ops`` (name -> function) wherever vLLM references the three LoRA ops."""
    for name in _PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a vLLM build without the torch ops (e.g. no LoRA support)
            continue
        for attr, function in ops.items():
            if hasattr(module, attr):
                current = getattr(module, attr)
                if current is not REPLACEMENTS[attr]:
                    STOCK.setdefault(attr, current)
                setattr(module, attr, function)


def register() -> None:
    """Entry point of the plugin: on the CPU platform, swap in the grouped ops.

    Safe to call many times and in processes that never use LoRA. The ``sgmv_*`` ops
    call the ``bgmv_*`` ones through their module's globals, so prefill is covered too.
    """
    if not _on_cpu():
        logger.debug("cpu_lora: not the CPU platform, vLLM's LoRA kernels left alone")
        return
    install(REPLACEMENTS)
    logger.debug("cpu_lora: patched %s", ", ".join(REPLACEMENTS))
