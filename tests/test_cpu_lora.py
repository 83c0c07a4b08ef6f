"""The grouped CPU LoRA ops against vLLM's own, op by op.

vLLM's ops are the reference wherever they are right (batches without base-model rows);
for base rows (index -1) they pick the last adapter slot, which each mixed test shows
still happens upstream, and ours leave those rows untouched.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from services.vllm_plugins import cpu_lora  # noqa: E402

# The plugin patches vLLM only on its CPU platform (and these are the ops that platform runs).
pytestmark = pytest.mark.cpu_platform

SLOTS, RANK, HIDDEN, OUT = 4, 8, 64, 96
#: Per-token slots: one adapter everywhere; several adapters; adapters mixed with base rows.
BATCHES = {
    "one adapter": [2, 2, 2, 2, 2, 2],
    "several adapters": [0, 3, 1, 3, 0, 2],
    "mixed with base": [-1, 0, 2, -1, 2, 3],
    "base only": [-1, -1, -1],
}
#: bf16 tolerance against vLLM's ops: both round to bf16, but sum in different orders.
BF16 = {"atol": 0.05, "rtol": 0.02}


def upstream() -> Any:
    """vLLM's module of torch ops, as shipped (the plugin may have patched it in this process)."""
    return importlib.reload(importlib.import_module("vllm.lora.ops.torch_ops.lora_ops"))


def tensors(rows: int, dtype: Any, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, HIDDEN, generator=gen).to(dtype),
        "a": torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen).to(dtype),
        "b": torch.randn(SLOTS, 1, OUT, RANK, generator=gen).to(dtype),
        "y": torch.randn(rows, RANK, generator=gen).to(dtype),
        "out": torch.randn(rows, OUT + 16, generator=gen).to(dtype),
    }


def tolerance(dtype: Any) -> dict[str, float]:
    return BF16 if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}


def test_rows_are_grouped_by_adapter_without_base_rows() -> None:
    assert cpu_lora.adapter_rows(torch.tensor([2, 2, 2])) == [(2, None)]
    assert cpu_lora.adapter_rows(torch.tensor([-1, -1])) == []
    assert cpu_lora.adapter_rows(torch.tensor([], dtype=torch.long)) == []
    groups = cpu_lora.adapter_rows(torch.tensor([-1, 3, 0, 3, -1]))
    assert [(slot, rows.tolist()) for slot, rows in groups] == [(0, [2]), (3, [1, 3])]  # type: ignore[union-attr]
    # The last grouping is reused only for equal contents: an in-place change is seen.
    indices = torch.tensor([1, 1, 1])
    assert cpu_lora.adapter_rows(indices) == [(1, None)]
    indices[0] = -1
    [(slot, rows)] = cpu_lora.adapter_rows(indices)
    assert slot == 1 and rows is not None and rows.tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", ["one adapter", "several adapters"])
def test_shrink_and_expands_equal_vllms_own_without_base_rows(batch: str, dtype: Any) -> None:
    reference, indices = upstream(), torch.tensor(BATCHES[batch])
    t = tensors(len(indices), dtype)
    # shrink writes into a float32 buffer, as vLLM's punica wrapper allocates it
    theirs, ours = torch.zeros(len(indices), RANK), torch.zeros(len(indices), RANK)
    reference.bgmv_shrink(t["x"], t["a"], theirs, indices, 0.5)
    cpu_lora.bgmv_shrink(t["x"], t["a"], ours, indices, 0.5)
    torch.testing.assert_close(ours, theirs, **tolerance(dtype))
    for add_inputs in (True, False):
        theirs, ours = t["out"].clone(), t["out"].clone()
        reference.bgmv_expand(t["y"], t["b"], theirs, indices, add_inputs)
        cpu_lora.bgmv_expand(t["y"], t["b"], ours, indices, add_inputs)
        torch.testing.assert_close(ours, theirs, **tolerance(dtype))
        theirs, ours = t["out"].clone(), t["out"].clone()
        reference.bgmv_expand_slice(t["y"], t["b"], theirs, indices, 8, OUT, add_inputs)
        cpu_lora.bgmv_expand_slice(t["y"], t["b"], ours, indices, 8, OUT, add_inputs)
        torch.testing.assert_close(ours, theirs, **tolerance(dtype))


@pytest.mark.parametrize("add_inputs", [True, False])
def test_base_rows_get_no_delta_and_adapter_rows_are_right(add_inputs: bool) -> None:
    reference, indices = upstream(), torch.tensor(BATCHES["mixed with base"])
    base, lora = (indices < 0).nonzero().squeeze(1), (indices >= 0).nonzero().squeeze(1)
    t = tensors(len(indices), torch.float32)
    buggy, ours = torch.zeros(len(indices), RANK), torch.zeros(len(indices), RANK)
    reference.bgmv_shrink(t["x"], t["a"], buggy, indices, 1.0)
    cpu_lora.bgmv_shrink(t["x"], t["a"], ours, indices, 1.0)
    assert buggy[base].abs().sum() > 0, "upstream no longer reads slot -1 as the last adapter: revisit the plugin"
    assert torch.equal(ours[base], torch.zeros(len(base), RANK))
    torch.testing.assert_close(ours[lora], buggy[lora])
    for op, args in (
        ("bgmv_expand", ()),
        ("bgmv_expand_slice", (8, OUT)),
    ):
        buggy, ours = t["out"].clone(), t["out"].clone()
        getattr(reference, op)(t["y"], t["b"], buggy, indices, *args, add_inputs)
        getattr(cpu_lora, op)(t["y"], t["b"], ours, indices, *args, add_inputs)
        assert not torch.equal(buggy[base], t["out"][base])
        assert torch.equal(ours[base], t["out"][base])
        torch.testing.assert_close(ours[lora], buggy[lora])


def test_prefill_ops_reach_the_grouped_ones_through_the_module() -> None:
    """sgmv_* explode per-sequence slots to tokens and call bgmv_* by module global."""
    module = upstream()
    try:
        cpu_lora.install(cpu_lora.REPLACEMENTS)
        t = tensors(5, torch.float32)
        seq_lens, seq_slots = torch.tensor([2, 3]), torch.tensor([-1, 1])
        out = t["out"].clone()
        module.sgmv_expand(t["y"], t["b"], out, None, seq_lens, seq_slots, 2, 3, 5, True)
        assert torch.equal(out[:2], t["out"][:2])  # the base sequence's tokens
        expected = t["out"][2:, :OUT] + t["y"][2:] @ t["b"][1, 0].T
        torch.testing.assert_close(out[2:, :OUT], expected)
    finally:
        upstream()


def test_install_swaps_every_reference_and_keeps_the_stock_ops() -> None:
    stock = upstream().bgmv_shrink
    cpu_lora.STOCK.clear()
    try:
        cpu_lora.register()  # this box is the CPU platform
        punica = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
        ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
        for name, replacement in cpu_lora.REPLACEMENTS.items():
            assert getattr(punica, name) is replacement
            assert getattr(ops, name) is replacement
        assert cpu_lora.STOCK["bgmv_shrink"] is stock
        cpu_lora.install(cpu_lora.STOCK)
        assert punica.bgmv_shrink is stock
    finally:
        upstream()
        cpu_lora.register()


def test_only_the_cpu_platform_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    ops = upstream()
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    cpu_lora.register()
    assert ops.bgmv_shrink is not cpu_lora.bgmv_shrink
    monkeypatch.undo()
    cpu_lora.register()
    assert ops.bgmv_shrink is cpu_lora.bgmv_shrink


def test_plugin_is_declared_for_vllm() -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "services.vllm_plugins.cpu_lora:register" in names
