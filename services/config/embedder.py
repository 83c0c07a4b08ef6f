"""Config of the Embedder deployment."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from services.config.base import DeploymentOptions, StrictModel

#: Files of a folder ``cs-export-onnx`` writes, which ``runtime: onnxruntime`` loads.
ONNX_MODEL_FILE = "model.onnx"
ONNX_WEIGHTS_FILE = "model.onnx.data"
ONNX_TOKENIZER_FILE = "tokenizer.json"
ONNX_MANIFEST_FILE = "export.json"
#: A SentencePiece model of the export's vocabulary, and how its ids are framed (specials, template).
ONNX_SENTENCEPIECE_MODEL_FILE = "sentencepiece.model"
ONNX_SENTENCEPIECE_FRAME_FILE = "sentencepiece.json"


class RerankerConfig(StrictModel):
    """A cross-encoder that scores (question, passage) pairs (FlagEmbedding ``FlagReranker``)."""

    model: str = Field(description="Model folder or hub id, e.g. BAAI/bge-reranker-v2-m3.")
    max_length: int = Field(512, ge=8, le=8192, description="Token limit per (question, passage) pair.")
    use_fp16: bool = Field(False, description="Half precision; only on GPUs.")
    batch_size: int = Field(32, ge=1, description="Pairs scored per forward pass.")


class EmbedderConfig(StrictModel):
    """The embedding model: a dense model through transformers or ONNX Runtime, or BGE-M3 through FlagEmbedding."""

    model: str = Field(description="Model folder or hub id, e.g. BAAI/bge-m3.")
    family: Literal["bge-m3", "dense"] = Field(
        description="'bge-m3' loads FlagEmbedding's BGEM3FlagModel (dense + sparse); 'dense' loads the model with "
        "transformers or ONNX Runtime (see runtime; dense only; what FlagEmbedding's FlagModel computes)."
    )
    pooling_method: Literal["cls", "mean"] = Field(
        "cls", description="Pooling of dense models: BGE uses cls, sentence-transformers models use mean."
    )
    query_instruction: str | None = Field(None, description="Prefix put before queries (not passages).")
    passage_instruction: str | None = Field(None, description="Prefix put before passages.")
    runtime: Literal["torch", "onnxruntime"] = Field(
        "torch",
        description="What runs a 'dense' model: 'torch' (transformers) or 'onnxruntime' (CPU only; `model` is then "
        "the folder `cs-export-onnx MODEL_DIR DEST_DIR` wrote, checked against torch when it was written). ONNX "
        "Runtime: a query half the CPU on one core, and no torch in the Embedder or the knowledge-sync job "
        "(benchmarks/README.md, 'Embedding').",
    )
    max_length: int = Field(512, ge=8, le=8192, description="Token limit per text.")
    use_fp16: bool = Field(False, description="Half precision; only on GPUs.")
    use_bf16: bool | Literal["auto"] = Field(
        False,
        description="bfloat16 weights (family 'dense'), on the CPU too: queries ~1.5x faster where the CPU has "
        "native bfloat16 (AVX512-BF16, AMX), slower where it has not; 'auto': where the device has it. Check "
        "cs-eval first: e5-small lost recall in bfloat16 (benchmarks/README.md, 'Answerability').",
    )
    device: str | None = Field(
        None, description="'cpu', 'cuda:0', ...; None: the first GPU if there is one, else the CPU."
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most texts in one forward pass: those that queued while the model was busy."
    )
    reranker: RerankerConfig | None = Field(
        None,
        description="A cross-encoder loaded beside the embedding model, for orchestrator.reranking; None loads none.",
    )
    health_model_check_s: float = Field(
        60,
        ge=0,
        description="A health check runs the model (and the cross-encoder) only when it has not answered for this "
        "long; a failed call makes the next check run it. Each check used to run it: with Serve's checks and each "
        "orchestrator's /healthz probe that is a forward pass every few seconds of an idle platform. 0: every check.",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @model_validator(mode="after")
    def _one_precision(self) -> Self:
        if self.use_fp16 and self.use_bf16:
            raise ValueError("use_fp16 and use_bf16 are both set: choose one precision")
        if self.use_bf16 and self.family != "dense":
            # FlagEmbedding's BGE-M3 encode casts a CPU model back to float32 on every call.
            raise ValueError("use_bf16 is for family 'dense'; BGE-M3 takes use_fp16 on a GPU")
        if self.runtime == "onnxruntime":
            if self.family != "dense":
                raise ValueError("runtime 'onnxruntime' is for family 'dense'; BGE-M3 runs in torch")
            if self.use_fp16 or self.use_bf16:
                raise ValueError("runtime 'onnxruntime' runs the float32 export: unset use_fp16 and use_bf16")
            if self.device not in (None, "cpu"):
                raise ValueError(f"runtime 'onnxruntime' runs on the CPU, not on device {self.device!r}: use 'torch'")
        return self
