"""The tokenizer of an ONNX export: the tokenizers library's pipeline, or SentencePiece where the export wrote one.

An XLM-R vocabulary (multilingual e5, BGE-M3: 250k Unigram pieces) costs ~280 MB in the
tokenizers library, whose Unigram model keeps a trie of hash maps; SentencePiece, for which
these vocabularies were trained, holds the same pieces and scores in ~50 MB. ``cs-export-onnx``
writes a SentencePiece model beside ``tokenizer.json`` only for that pipeline's shape, and
keeps it only when its ids equal transformers' for every probe text; otherwise the
tokenizers pipeline is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from services.config.embedder import ONNX_SENTENCEPIECE_FRAME_FILE, ONNX_SENTENCEPIECE_MODEL_FILE, ONNX_TOKENIZER_FILE


def load_export_tokenizer(folder: Path) -> Any:
    """The tokenizer the Embedder runs for an export: SentencePiece where it wrote one, else ``tokenizer.json``."""
    if (folder / ONNX_SENTENCEPIECE_MODEL_FILE).is_file():
        return SentencePieceTokenizer(folder / ONNX_SENTENCEPIECE_MODEL_FILE, folder / ONNX_SENTENCEPIECE_FRAME_FILE)
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(folder / ONNX_TOKENIZER_FILE))


class TokenIds:
    """The ids of one text, as the tokenizers library's ``Encoding`` offers them to the Embedder."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` ids."""
        del self.ids[length:]


class SentencePieceTokenizer:
    """SentencePiece with the part of the tokenizers library's ``Tokenizer`` interface the Embedder uses.

    What transformers' pipeline does around the model is done here: special tokens written
    in the text (``<s>``, ``<mask>``) are split out and become their ids, as transformers'
    added tokens do, and ``post_process`` frames the ids with the template's special tokens.
    """

    def __init__(self, model_file: Path, frame_file: Path) -> None:
        import sentencepiece

        frame = json.loads(frame_file.read_text())
        self._model = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._specials: dict[str, int] = frame["specials"]
        self._prefix: list[int] = frame["prefix"]
        self._suffix: list[int] = frame["suffix"]
        longest_first = sorted(self._specials, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(token) for token in longest_first) + ")")

    def no_truncation(self) -> None:
        """Nothing to undo: this tokenizer never cuts."""

    def no_padding(self) -> None:
        """Nothing to undo: this tokenizer never pads."""

    def num_special_tokens_to_add(self, is_pair: bool) -> int:
        """Ids ``post_process`` adds to one text."""
        return len(self._prefix) + len(self._suffix)

    def post_process(self, encoding: TokenIds) -> TokenIds:
        """The ids framed by the template's special tokens."""
        return TokenIds(self._prefix + encoding.ids + self._suffix)

    def encode(self, text: str, add_special_tokens: bool = True) -> TokenIds:
        """The ids of one text."""
        ids: list[int] = []
        for part in self._special_split.split(text) if self._specials else [text]:
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._model.encode(part))
        encoding = TokenIds(ids)
        return self.post_process(encoding) if add_special_tokens else encoding

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[TokenIds]:
        """The ids of each text."""
        return [self.encode(text, add_special_tokens) for text in texts]
