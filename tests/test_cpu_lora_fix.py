"""The CPU mixed-batch LoRA fix, at the level of the three patched ops.

Without the fix a token with LoRA index -1 (no adapter) picks the *last* adapter slot.
The upstream functions are kept as a reference: each test shows the upstream bug
and that our replacement gives the base rows no delta while LoRA rows are unchanged.
"""

from __future__ import annotations

import importlib

import pytest

torch = pytest.importorskip("torch")
upstream = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from services.vllm_plugins import cpu_lora_fix  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 3, 4, 16, 24
INDICES = torch.tensor([-1, 0, 2, -1])  # rows 0 and 3 are base-model tokens


def fresh_upstream():  # the plugin may have patched the module in this process already
    module = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    return importlib.reload(module)


@pytest.fixture()
def weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(len(INDICES), HIDDEN, generator=gen),
        "a": torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen),
        "b": torch.randn(SLOTS, 1, OUT, RANK, generator=gen),
        "y": torch.randn(len(INDICES), RANK, generator=gen),
        "base": torch.randn(len(INDICES), OUT, generator=gen),
    }


def test_shrink(weights: dict[str, torch.Tensor]) -> None:
    reference = fresh_upstream()
    buggy = torch.zeros(len(INDICES), RANK)
    reference.bgmv_shrink(weights["x"], weights["a"], buggy, INDICES, 0.5)
    fixed = torch.zeros(len(INDICES), RANK)
    cpu_lora_fix.bgmv_shrink(weights["x"], weights["a"], fixed, INDICES, 0.5)
    assert buggy[0].abs().sum() > 0, "upstream bug no longer reproduces: the plugin may be obsolete"
    assert torch.equal(fixed[[0, 3]], torch.zeros(2, RANK))
    torch.testing.assert_close(fixed[[1, 2]], buggy[[1, 2]])


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand(weights: dict[str, torch.Tensor], add_inputs: bool) -> None:
    reference = fresh_upstream()
    buggy = weights["base"].clone()
    reference.bgmv_expand(weights["y"], weights["b"], buggy, INDICES, add_inputs)
    fixed = weights["base"].clone()
    cpu_lora_fix.bgmv_expand(weights["y"], weights["b"], fixed, INDICES, add_inputs)
    assert not torch.equal(buggy[0], weights["base"][0])
    torch.testing.assert_close(fixed[[0, 3]], weights["base"][[0, 3]])
    torch.testing.assert_close(fixed[[1, 2]], buggy[[1, 2]])


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice(weights: dict[str, torch.Tensor], add_inputs: bool) -> None:
    reference = fresh_upstream()
    offset, size = 4, OUT
    base = torch.randn(len(INDICES), OUT + 8)
    buggy = base.clone()
    reference.bgmv_expand_slice(weights["y"], weights["b"], buggy, INDICES, offset, size, add_inputs)
    fixed = base.clone()
    cpu_lora_fix.bgmv_expand_slice(weights["y"], weights["b"], fixed, INDICES, offset, size, add_inputs)
    assert not torch.equal(buggy[0], base[0])
    torch.testing.assert_close(fixed[[0, 3]], base[[0, 3]])
    torch.testing.assert_close(fixed[[1, 2]], buggy[[1, 2]])


def test_register_patches_every_reference() -> None:
    fresh_upstream()
    cpu_lora_fix.register()
    punica = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    for name, replacement in cpu_lora_fix.REPLACEMENTS.items():
        assert getattr(punica, name) is replacement
        assert getattr(ops, name) is replacement


def test_plugin_is_declared_for_vllm() -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "services.vllm_plugins.cpu_lora_fix:register" in names
