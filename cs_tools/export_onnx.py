"""Export a dense embedding model to ONNX for the Embedder's ``runtime: onnxruntime``.

Usage: ``cs-export-onnx MODEL_DIR DEST_DIR`` (a transformers folder of a BERT-like encoder:
BGE, e5, sentence-transformers). ``DEST_DIR`` then holds:

* ``model.onnx`` and ``model.onnx.data``: the encoder up to its last hidden state, with the
  weights in a separate file so that ONNX Runtime memory-maps them (the 250k-row embedding
  table of an XLM-R vocabulary then costs only the rows that are read);
* ``tokenizer.json``: the tokenizers-library pipeline *as transformers builds it* for the
  model (its XLM-R class rebuilds some pipelines, so the original ``tokenizer.json`` would
  give other ids), without padding or truncation (the Embedder cuts and pads);
* for an XLM-R-shaped vocabulary (multilingual e5, BGE-M3), ``sentencepiece.model`` and
  ``sentencepiece.json``: the same pieces for SentencePiece, ~50 MB in memory where the
  tokenizers library takes ~280 MB; kept only when its ids equal transformers' for every
  probe (:mod:`services.embedding_tokenizer`);
* ``export.json``: where it came from and the largest difference measured against torch.

The export is checked before it is kept: the ids of every probe text must equal
transformers' own and the hidden states ONNX Runtime computes must match torch's within
``1e-4`` (padded batches and a text cut at 512 tokens, or the model's length if shorter,
included); otherwise nothing is written. Pooling, instructions and normalization stay in the Embedder's config.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from services.config.embedder import ONNX_MANIFEST_FILE as MANIFEST_FILE
from services.config.embedder import ONNX_MODEL_FILE as MODEL_FILE
from services.config.embedder import ONNX_SENTENCEPIECE_FRAME_FILE as SENTENCEPIECE_FRAME_FILE
from services.config.embedder import ONNX_SENTENCEPIECE_MODEL_FILE as SENTENCEPIECE_MODEL_FILE
from services.config.embedder import ONNX_TOKENIZER_FILE as TOKENIZER_FILE
from services.config.embedder import ONNX_WEIGHTS_FILE as WEIGHTS_FILE
from services.embedding_tokenizer import SentencePieceTokenizer, load_export_tokenizer

#: Bumped when an export gains files: 2 added the SentencePiece tokenizer and the source's fingerprint.
EXPORT_FORMAT = 2
#: Largest absolute difference of a hidden-state value (ONNX Runtime against torch) that is kept.
TOLERANCE = 1e-4

_PROBES = [
    "query: 我的订单什么时候发货？",
    "passage: Returns are accepted within 30 days of delivery, unused and in the original packaging.",
    "可以开发票吗",
    "  odd\twhitespace  and a trailing space ",
    "ＦＵＬＬ－ＷＩＤＴＨ　ｔｅｘｔ１２３",
    "<mask> and <s> written in the text",
    "退货 " * 400,  # longer than the model reads: cut at its length
]


class ExportError(RuntimeError):
    """The model could not be exported, or its export did not match torch."""


def export_dense_model(model_dir: Path, dest: Path) -> Path:
    """Export, check and write the model into ``dest`` (replaced only once the check passed).

    Args:
        model_dir: A transformers folder of an encoder model.
        dest: The folder to write (created with its parents): absent, empty, or an earlier export.

    Returns:
        ``dest``.

    Raises:
        ExportError: ``dest`` is not a place for an export, the export failed, or ids or hidden
            states differ from torch's.

    """
    _refuse_destination(model_dir, dest)
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    length = min(int(getattr(model.config, "max_position_embeddings", 512)), 512)
    fingerprint = source_fingerprint(model_dir)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _export_graph(model, tokenizer, staging)
        backend = tokenizer.backend_tokenizer
        backend.no_truncation()
        backend.no_padding()
        backend.save(str(staging / TOKENIZER_FILE))
        sentencepiece = write_sentencepiece(staging / TOKENIZER_FILE, staging) and keep_sentencepiece_if_equal(
            staging, tokenizer
        )
        difference = _check(model, tokenizer, staging, length)
        (staging / MANIFEST_FILE).write_text(
            json.dumps(
                {
                    "source": str(model_dir),
                    "source_sha256": fingerprint,
                    "hidden_size": int(model.config.hidden_size),
                    "max_length": length,
                    "max_abs_difference": difference,
                    "tokenizer": "sentencepiece" if sentencepiece else "tokenizers",
                    "format": EXPORT_FORMAT,
                    "torch": torch.__version__,
                },
                indent=2,
            )
            + "\n"
        )
        _replace(dest, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def source_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the model folder's config, weights and tokenizer files: an export names what it came from."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in {".safetensors", ".bin", ".json", ".model", ".txt"}:
            with path.open("rb") as handle:
                digest.update(path.name.encode() + b"\0" + hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def _refuse_destination(model_dir: Path, dest: Path) -> None:
    """Raise unless ``dest`` may be replaced: absent, an empty folder, or an earlier export; never the model's own."""
    source, target = model_dir.resolve(), dest.resolve()
    if target == source or source.is_relative_to(target):
        raise ExportError(f"{dest} holds the model itself: choose a folder of its own for the export")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{dest} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise ExportError(f"{dest} is neither empty nor an earlier export (no {MANIFEST_FILE}): it is left alone")


def _replace(dest: Path, staging: Path) -> None:
    """Put the checked export in place of ``dest``; the earlier one is moved aside first, then removed."""
    previous = dest.with_name(dest.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if dest.exists():
        dest.rename(previous)
    staging.rename(dest)
    shutil.rmtree(previous, ignore_errors=True)


def _last_hidden_state(model: Any) -> Any:
    """The model as a module of (input_ids, attention_mask) -> last hidden state, the graph that is traced."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder().eval()


def _export_graph(model: Any, tokenizer: Any, out: Path) -> None:
    """Trace the encoder with dynamic batch and length, then move its weights beside the graph."""
    import onnx
    import torch

    # Two texts of different lengths: the traced graph must take a padded batch.
    example = tokenizer(_PROBES[:2], padding=True, return_tensors="pt")
    traced = out / "traced.onnx"
    axes = {0: "batch", 1: "tokens"}
    try:
        with warnings.catch_warnings():
            # The tracer warns of every Python branch it freezes; the check after export is what counts.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _last_hidden_state(model),
                (example["input_ids"], example["attention_mask"]),
                str(traced),
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                opset_version=17,
                # The TorchScript exporter: the dynamo one needs onnxscript besides onnx.
                dynamo=False,
            )
    except Exception as err:
        raise ExportError(f"torch could not export the model: {err}") from err
    graph = onnx.load(str(traced))
    onnx.save(graph, str(out / MODEL_FILE), save_as_external_data=True, location=WEIGHTS_FILE, size_threshold=1024)
    traced.unlink()


def _check(model: Any, tokenizer: Any, out: Path, length: int) -> float:
    """Largest hidden-state difference of ONNX Runtime against torch over the probes; raises past the tolerance."""
    import numpy as np
    import onnxruntime
    import torch

    differing = _first_differing_probe(load_export_tokenizer(out), tokenizer)  # what the Embedder will run
    if differing is not None:
        raise ExportError(f"the saved tokenizer gives other ids than transformers' for {differing[:40]!r}")
    session = onnxruntime.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in ([_PROBES[0]], _PROBES[:3], _PROBES):
        inputs = tokenizer(batch, padding=True, truncation=True, max_length=length, return_tensors="pt")
        with torch.inference_mode():
            expected = model(**inputs).last_hidden_state.numpy()
        feed = {"input_ids": inputs["input_ids"].numpy(), "attention_mask": inputs["attention_mask"].numpy()}
        got = session.run(None, feed)[0]
        mask = inputs["attention_mask"].numpy()[..., None].astype(bool)
        worst = max(worst, float(np.abs((expected - got) * mask).max()))
    if worst > TOLERANCE:
        raise ExportError(f"ONNX Runtime's hidden states differ from torch's by {worst:.2e} (> {TOLERANCE})")
    return worst


def write_sentencepiece(tokenizer_json: Path, folder: Path) -> bool:
    """Write a SentencePiece model of an XLM-R-shaped ``tokenizer.json`` into ``folder``; False for any other shape.

    The shape: a Unigram model, SentencePiece's precompiled normalizer, whitespace split then
    the metaspace, and a template of special tokens around the text. The pieces keep their
    order, so the ids are the vocabulary's own; special tokens become control pieces (never
    matched in text: :class:`SentencePieceTokenizer` splits them out, as transformers does).
    """
    from sentencepiece import sentencepiece_model_pb2

    spm_model: Any = sentencepiece_model_pb2  # generated protobuf code: no types to check

    spec = json.loads(tokenizer_json.read_text())
    model, normalizer, pre, post = (
        spec.get(k) or {} for k in ("model", "normalizer", "pre_tokenizer", "post_processor")
    )
    steps = pre.get("pretokenizers") or []
    added = spec.get("added_tokens", [])
    specials = {token["content"]: token["id"] for token in added}
    template = [item["SpecialToken"]["id"] for item in post.get("single", []) if "SpecialToken" in item]
    if (
        model.get("type") != "Unigram"
        or model.get("byte_fallback")
        or not isinstance(model.get("unk_id"), int)
        or normalizer.get("type") != "Precompiled"
        or [step.get("type") for step in steps] != ["WhitespaceSplit", "Metaspace"]
        or steps[-1].get("replacement") != "\u2581"
        or steps[-1].get("prepend_scheme") != "always"
        or post.get("type") != "TemplateProcessing"
        # Special tokens matched as they are written, as SentencePieceTokenizer splits them out.
        or any(not t.get("special") or t.get("normalized") or t.get("single_word") for t in added)
        or any(token not in specials for token in template)
    ):
        return False
    proto = spm_model.ModelProto()
    piece_type = spm_model.ModelProto.SentencePiece
    for index, (piece, score) in enumerate(model["vocab"]):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        if index == model["unk_id"]:
            entry.type = piece_type.UNKNOWN
        elif piece in specials:
            entry.type = piece_type.CONTROL
        else:
            entry.type = piece_type.NORMAL
    proto.trainer_spec.model_type = spm_model.TrainerSpec.UNIGRAM
    proto.trainer_spec.unk_id = model["unk_id"]
    proto.trainer_spec.bos_id = proto.trainer_spec.eos_id = proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "precompiled"
    proto.normalizer_spec.precompiled_charsmap = base64.b64decode(normalizer["precompiled_charsmap"])
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    before_and_after: tuple[list[int], list[int]] = ([], [])
    side = 0
    for item in post["single"]:
        if "Sequence" in item:
            side = 1  # the text: special tokens from here on follow it
        else:
            before_and_after[side].append(specials[item["SpecialToken"]["id"]])
    (folder / SENTENCEPIECE_MODEL_FILE).write_bytes(proto.SerializeToString())
    frame = {"specials": specials, "prefix": before_and_after[0], "suffix": before_and_after[1]}
    (folder / SENTENCEPIECE_FRAME_FILE).write_text(json.dumps(frame, ensure_ascii=False, indent=2) + "\n")
    return True


def keep_sentencepiece_if_equal(folder: Path, tokenizer: Any) -> bool:
    """Keep the folder's SentencePiece model only if its ids equal ``tokenizer``'s (transformers') for every probe.

    Returns:
        Whether it was kept; if not, its files are removed and the Embedder loads ``tokenizer.json``.

    """
    reader = SentencePieceTokenizer(folder / SENTENCEPIECE_MODEL_FILE, folder / SENTENCEPIECE_FRAME_FILE)
    if _first_differing_probe(reader, tokenizer) is None:
        return True
    for name in (SENTENCEPIECE_MODEL_FILE, SENTENCEPIECE_FRAME_FILE):
        (folder / name).unlink()
    return False


def _first_differing_probe(ours: Any, transformers_tokenizer: Any) -> str | None:
    """The first probe whose ids, bare or framed by the special tokens, differ between the two tokenizers."""
    for text in _PROBES:
        for framed in (False, True):
            theirs = transformers_tokenizer(text, add_special_tokens=framed)["input_ids"]
            if ours.encode(text, add_special_tokens=framed).ids != theirs:
                return text
    return None


def main(argv: list[str] | None = None) -> int:
    """Export MODEL_DIR to DEST_DIR; print the folder and the measured difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("model_dir", type=Path, help="A transformers folder of the embedding model.")
    parser.add_argument("dest", type=Path, help="The folder to write (replaced).")
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        print(f"error: {args.model_dir} is not a transformers model folder (no config.json)", file=sys.stderr)
        return 2
    try:
        dest = export_dense_model(args.model_dir, args.dest)
    except (ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    print(f"onnx: {dest} (largest difference from torch {manifest['max_abs_difference']:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
