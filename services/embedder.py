"""Embedder deployment: embedding models behind a batcher that takes what queued while the model ran.

Family ``bge-m3`` (FlagEmbedding's ``BGEM3FlagModel``) gives dense and learned-sparse
vectors; family ``dense`` (transformers alone) gives dense vectors only. Queries and
passages are encoded differently (instructions), so they are batched in separate queues.
The knowledge-sync job loads its backend with :func:`load_embedding_backend` too, so chunks
and queries are always embedded by the same code.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

from ray import serve
from ray.serve.deployment import Application

from services.config import EmbedderConfig, ObservabilityConfig, RerankerConfig
from services.config.embedder import ONNX_MANIFEST_FILE, ONNX_MODEL_FILE, ONNX_TOKENIZER_FILE, ONNX_WEIGHTS_FILE
from services.errors import DependencyUnavailableError, InvalidRequestError, ServiceError
from services.observability.gpu import start_gpu_sampling
from services.observability.logs import configure_replica_logging
from services.observability.metrics import Metrics, RayMetrics, names_for
from services.observability.tracing import tracer
from services.schemas import Embedding

logger = logging.getLogger(__name__)

TextKind = Literal["query", "passage"]
Item = TypeVar("Item")
Result = TypeVar("Result")


class EmbeddingBackend(Protocol):
    """What the platform needs from an embedding model."""

    @property
    def dimension(self) -> int:
        """Length of the dense vectors."""
        ...

    @property
    def has_sparse(self) -> bool:
        """Whether embeddings carry learned sparse weights."""
        ...

    @property
    def max_length(self) -> int:
        """Tokens the model reads per text; the rest is cut off."""
        ...

    def encode(self, texts: list[str], kind: TextKind) -> list[Embedding]:
        """Embed texts; ``kind`` selects the query or the passage instruction."""
        ...

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the model's tokenizer cuts it, without special tokens."""
        ...


class RerankingBackend(Protocol):
    """What the platform needs from a cross-encoder."""

    def score(self, query: str, passages: list[str]) -> list[float]:
        """Relevance of each passage to the query, 0..1."""
        ...


def _silence_flagembedding_progress_bars() -> None:
    """Turn off the progress bars FlagEmbedding draws for every call of 32 texts or more.

    They pass ``disable`` themselves, so tqdm's settings cannot reach them; in a replica
    they would write two bars to the log for every full batch.
    """
    from FlagEmbedding.inference.embedder.encoder_only import base, m3
    from FlagEmbedding.inference.reranker.encoder_only import base as reranker_base
    from tqdm import tqdm as real_tqdm

    def quiet(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return real_tqdm(*args, **kwargs)

    for module in (base, m3, reranker_base):
        module.tqdm = quiet
        if hasattr(module, "trange"):
            module.trange = lambda *a, **k: quiet(range(*a), **k)


def load_embedding_backend(config: EmbedderConfig) -> EmbeddingBackend:
    """The backend of ``config``: FlagEmbedding for BGE-M3; transformers or ONNX Runtime for dense models."""
    if config.family == "bge-m3":
        return BGEM3Backend(config)
    return OnnxEmbeddingBackend(config) if config.runtime == "onnxruntime" else DenseEmbeddingBackend(config)


class _DenseModel:
    """What every dense backend shares: instructions, batching, token ids cut and padded; the forward pass is theirs.

    It computes what FlagEmbedding's ``FlagModel`` does (instruction, tokenizer, one forward
    pass per ``max_batch_size`` texts, cls or mean pooling, normalization) with a tokenizer
    of the tokenizers library's interface (its ``Tokenizer``, not transformers' wrapper, or
    :class:`~services.embedding_tokenizer.SentencePieceTokenizer`).
    """

    def __init__(self, config: EmbedderConfig, tokenizer: Any) -> None:
        # transformers pads and cuts per call; a saved tokenizer.json may keep its own settings
        # (MiniLM's: 128 tokens). Counts must not be cut; inputs are cut and padded here.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._dimension = 0  # measured by the subclass once its model is loaded
        self._instructions: dict[TextKind, str | None] = {
            "query": config.query_instruction,
            "passage": config.passage_instruction,
        }
        self._pooling = config.pooling_method
        self._max_length = config.max_length
        self._batch_size = config.max_batch_size

    @property
    def dimension(self) -> int:
        """Length of the dense vectors (a subclass measures it once its model is loaded)."""
        return self._dimension

    @property
    def has_sparse(self) -> bool:
        """Dense models give no sparse weights."""
        return False

    @property
    def max_length(self) -> int:
        """Tokens the model reads per text (config ``max_length``)."""
        return self._max_length

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text with the model's own tokenizer, without special tokens."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: list[str], kind: TextKind) -> list[Embedding]:
        """Dense vectors in passes of ``max_batch_size`` texts, longest first (least padding), in the texts' order."""
        instruction = self._instructions[kind]
        if instruction:
            texts = [instruction + text for text in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors: list[Embedding | None] = [None] * len(texts)
        for start in range(0, len(order), self._batch_size):
            batch = order[start : start + self._batch_size]
            ids, mask = self._token_ids([texts[i] for i in batch])
            for i, vector in zip(batch, self._pooled_vectors(ids, mask), strict=True):
                vectors[i] = Embedding(dense=vector.tolist())
        return cast(list[Embedding], vectors)  # every index was filled by its batch

    def _token_ids(self, texts: list[str]) -> tuple[Any, Any]:
        """Token ids cut to ``max_length`` with the model's special tokens, padded, and their attention mask.

        What transformers' tokenizer call gives with ``truncation=True, padding=True``, as
        int64 numpy arrays. Padded positions are masked out, so the id they hold does not matter.
        """
        import numpy as np

        tokenizer = self._tokenizer
        room = self._max_length - tokenizer.num_special_tokens_to_add(False)
        encodings = []
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(room)
            encodings.append(tokenizer.post_process(encoding))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        return ids, mask

    def _pooled_vectors(self, ids: Any, mask: Any) -> Any:
        """Normalized pooled vectors of one forward pass over the padded batch, as float32 numpy rows."""
        raise NotImplementedError


class DenseEmbeddingBackend(_DenseModel):
    """A dense embedding model (BGE, e5, sentence-transformers) through transformers and torch.

    FlagEmbedding is not imported: its package imports its fine-tuning code (datasets, peft)
    on the way, 29 MB of every Embedder replica's memory for nothing it uses.
    """

    def __init__(self, config: EmbedderConfig) -> None:
        import torch
        from transformers import AutoModel

        super().__init__(config, _load_tokenizer(config.model))
        self._device = config.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        on_cpu = self._device.startswith("cpu")
        bf16 = config.use_bf16 if config.use_bf16 != "auto" else _has_native_bf16(self._device)
        # FlagEmbedding, too, takes use_fp16 on GPUs only (it casts a CPU model back to float32).
        dtype = torch.bfloat16 if bf16 else torch.float16 if config.use_fp16 and not on_cpu else torch.float32
        self._model = AutoModel.from_pretrained(config.model, dtype=dtype).to(self._device).eval()
        logger.info("dense embedding model on %s in %s", self._device, dtype)
        self._dimension = len(self.encode(["dimension probe"], "passage")[0].dense)

    @property
    def dtype(self) -> Any:
        """The torch dtype the model's weights are in."""
        return next(self._model.parameters()).dtype

    def _pooled_vectors(self, ids: Any, mask: Any) -> Any:
        """One forward pass in torch.

        FlagEmbedding's own ``encode`` would run the first batch of every call twice: a probe
        for the largest batch that fits in memory (FlagEmbedding PR #1229), 34 ms instead of
        16 ms for one MiniLM query on one core. Passes here are at most ``max_batch_size``.
        """
        import torch

        with torch.inference_mode():
            attention = torch.from_numpy(mask).to(self._device)
            hidden = self._model(
                input_ids=torch.from_numpy(ids).to(self._device), attention_mask=attention, return_dict=True
            ).last_hidden_state
            if self._pooling == "cls":
                pooled = hidden[:, 0]
            else:
                weights = attention.unsqueeze(-1).float()
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


class OnnxEmbeddingBackend(_DenseModel):
    """A dense embedding model exported by ``cs-export-onnx``, run by ONNX Runtime on the CPU; no torch in the process.

    Measured with multilingual-e5-small on one thread (benchmarks/README.md, 'Embedding'): one
    question 29 ms of CPU in torch, 13.4 ms here; 32 questions 341 ms, 321 ms here. The
    export's weights are memory-mapped, so the vocabulary table costs only the rows that are
    read; torch and transformers are never imported, and an XLM-R vocabulary is tokenized by
    SentencePiece where the export wrote one: the replica 381 MB against 1.1-1.2 GB in torch.
    """

    def __init__(self, config: EmbedderConfig) -> None:
        import onnxruntime

        from services.embedding_tokenizer import load_export_tokenizer

        folder = Path(config.model)
        files = (ONNX_MODEL_FILE, ONNX_WEIGHTS_FILE, ONNX_TOKENIZER_FILE, ONNX_MANIFEST_FILE)
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"embedder.model {folder} has no {' or '.join(missing)}: runtime 'onnxruntime' takes the folder "
                "`cs-export-onnx MODEL_DIR DEST_DIR` writes"
            )
        exported_length = int(json.loads((folder / ONNX_MANIFEST_FILE).read_text())["max_length"])
        if config.max_length > exported_length:
            raise ValueError(
                f"embedder.max_length {config.max_length} is more than the {exported_length} tokens the export "
                f"in {folder} was checked for: lower it"
            )
        super().__init__(config, load_export_tokenizer(folder))
        options = onnxruntime.SessionOptions()
        # Ray sets OMP_NUM_THREADS to the CPUs the replica reserved (at least 1), which torch
        # follows; ONNX Runtime reads no such variable, so it is passed on (unset: its default).
        options.intra_op_num_threads = _omp_threads()
        # Its threads spin after each pass by default: CPU taken from the engine beside them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            str(folder / ONNX_MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        # Its memory arena keeps the largest pass's buffers (+430 MB after 8 texts of 512
        # tokens, measured); shrunk after each pass, it holds the weights and little more.
        self._run_options = onnxruntime.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        logger.info("dense embedding model in ONNX Runtime, %s threads", options.intra_op_num_threads or "default")
        self._dimension = len(self.encode(["dimension probe"], "passage")[0].dense)

    def _pooled_vectors(self, ids: Any, mask: Any) -> Any:
        """One forward pass in ONNX Runtime, pooled and normalized in numpy."""
        import numpy as np

        (hidden,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask}, self._run_options)
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
        # As torch's normalize: a zero vector stays zero instead of becoming NaN.
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (pooled / norms).astype(np.float32)


class BGEM3Backend:
    """BGE-M3 (dense and learned-sparse vectors) through FlagEmbedding's ``BGEM3FlagModel``."""

    def __init__(self, config: EmbedderConfig) -> None:
        from FlagEmbedding import BGEM3FlagModel

        _silence_flagembedding_progress_bars()
        self._max_length = config.max_length
        self._model = BGEM3FlagModel(
            config.model,
            normalize_embeddings=True,
            use_fp16=config.use_fp16,
            devices=config.device,
            query_instruction_for_retrieval=config.query_instruction,
            passage_instruction_for_retrieval=config.passage_instruction,
            query_max_length=config.max_length,
            passage_max_length=config.max_length,
            batch_size=config.max_batch_size,
        )
        self._dimension = len(self.encode(["dimension probe"], "passage")[0].dense)

    @property
    def dimension(self) -> int:
        """Length of the dense vectors."""
        return self._dimension

    @property
    def has_sparse(self) -> bool:
        """BGE-M3 gives learned sparse weights."""
        return True

    @property
    def max_length(self) -> int:
        """Tokens the model reads per text (config ``max_length``)."""
        return self._max_length

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text with the model's own tokenizer, without special tokens."""
        ids = self._model.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        return [len(i) for i in ids]

    def encode(self, texts: list[str], kind: TextKind) -> list[Embedding]:
        """Dense and sparse vectors with the query or passage instruction."""
        encode = self._model.encode_queries if kind == "query" else self._model.encode_corpus
        out = encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=False)
        return [
            Embedding(dense=d.tolist(), sparse={int(k): float(v) for k, v in s.items()})
            for d, s in zip(out["dense_vecs"], out["lexical_weights"], strict=True)
        ]


def _load_tokenizer(model: str) -> Any:
    """The tokenizers library's ``Tokenizer`` that transformers builds for the model, without transformers' wrapper.

    The wrapper holds the vocabulary again in Python: for the XLM-R vocabulary of
    multilingual e5 and BGE-M3 (250k pieces) 359 MB with it, 295 MB without. transformers
    builds it, not ``tokenizer.json`` alone: its class rebuilds some pipelines (XLM-R's
    splits on whitespace, so a trailing space is no token), and the ids must stay those
    the knowledge base was embedded with.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).backend_tokenizer


def _omp_threads() -> int:
    """Threads ``OMP_NUM_THREADS`` asks for (its first level where it lists several); 0 when unset or unreadable."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0").split(",")[0]))
    except ValueError:
        return 0


def _has_native_bf16(device: str) -> bool:
    """Whether the device computes in bfloat16 natively: AVX512-BF16 or AMX on a CPU, Ampere or later on CUDA."""
    import torch

    if device.startswith("cpu"):
        # Private but stable helpers; vLLM's CPU platform chooses its bfloat16 kernels with the first.
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(device.startswith("cuda") and torch.cuda.is_bf16_supported())


class FlagRerankerBackend:
    """The real cross-encoder: FlagEmbedding's ``FlagReranker`` (bge-reranker-v2-m3 in production)."""

    def __init__(self, config: RerankerConfig, device: str | None) -> None:
        from FlagEmbedding import FlagReranker

        _silence_flagembedding_progress_bars()
        self._model = FlagReranker(
            config.model,
            use_fp16=config.use_fp16,
            devices=device,
            max_length=config.max_length,
            batch_size=config.batch_size,
            normalize=True,
        )

    def score(self, query: str, passages: list[str]) -> list[float]:
        """Sigmoid of the cross-encoder's logit for each (query, passage) pair."""
        if not passages:
            return []
        scores = self._model.compute_score([(query, passage) for passage in passages], normalize=True)
        # FlagReranker returns a bare float for a single pair.
        return [float(s) for s in (scores if isinstance(scores, list) else [scores])]


class DrainingBatcher(Generic[Item, Result]):
    """One batch at a time, of everything that queued while the last one ran; a lone call runs at once.

    Serve's ``@serve.batch`` waits ``batch_wait_timeout_s`` for a batch to fill, which every
    lone query pays in full (10 ms by default); with no wait, its loop forms the next batch
    while the last one runs, so each text that comes meanwhile becomes a batch of its own.
    Here the texts that come while the model is busy wait for it, and go in together when it
    is free. Each batch runs in the context of its first caller (its trace span nests there),
    and a caller that went away is left out.
    """

    def __init__(self, run: Callable[[list[Item]], Coroutine[Any, Any, list[Result]]], max_batch_size: int) -> None:
        self._run = run
        self._max_batch_size = max_batch_size
        self._waiting: deque[tuple[Item, asyncio.Future[Result], contextvars.Context]] = deque()
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, item: Item) -> Result:
        """``run``'s result for this item, from the batch it went in."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, future, contextvars.copy_context()))
        if self._worker is None or self._worker.done():
            # In a context of its own: no caller's cancellation or span reaches the worker itself.
            self._worker = loop.create_task(self._drain(), context=contextvars.Context())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            taken = [self._waiting.popleft() for _ in range(min(self._max_batch_size, len(self._waiting)))]
            live = [entry for entry in taken if not entry[1].done()]
            if not live:
                continue
            try:
                results: list[Result] = await asyncio.get_running_loop().create_task(
                    self._run([item for item, _, _ in live]), context=live[0][2]
                )
            except Exception as err:  # every caller of the batch gets it; the next batch still runs
                for _, future, _ in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future, _), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)


class Embedder:
    """Ray Serve deployment around an :class:`EmbeddingBackend` (and a :class:`RerankingBackend`, if configured)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        config: EmbedderConfig,
        observability: ObservabilityConfig | None = None,
        *,
        backend: EmbeddingBackend | None = None,
        reranker: RerankingBackend | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        observability = observability or ObservabilityConfig()
        configure_replica_logging(observability.log_level, observability.log_format)
        self._metrics = metrics or RayMetrics(names_for("Embedder"))
        if backend is None:
            backend = await asyncio.to_thread(load_embedding_backend, config)
        self._backend: EmbeddingBackend = backend
        if reranker is None and config.reranker is not None:
            reranker = await asyncio.to_thread(FlagRerankerBackend, config.reranker, config.device)
        self._reranker = reranker
        self._health_model_check_s = config.health_model_check_s
        # When the model and the cross-encoder last answered (monotonic), None once they failed.
        self._model_answered_at: float | None = None
        self._reranker_answered_at: float | None = None
        # Queries and passages are encoded with different instructions: a batcher each.
        self._batches: dict[TextKind, DrainingBatcher[str, Embedding | ServiceError]] = {
            "query": DrainingBatcher(lambda texts: self._encode(texts, "query"), config.max_batch_size),
            "passage": DrainingBatcher(lambda texts: self._encode(texts, "passage"), config.max_batch_size),
        }
        self._gpu_sampling = start_gpu_sampling(
            self._metrics, config.deployment.num_gpus, observability.gpu_sample_interval_s
        )

    def info(self) -> dict[str, Any]:
        """Dimension, sparse support and token limit, for the retriever's schema and chunking."""
        backend = self._backend
        return {
            "dimension": backend.dimension,
            "has_sparse": backend.has_sparse,
            "max_length": backend.max_length,
            "has_reranker": self._reranker is not None,
        }

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts with the model's tokenizer, for chunking in the knowledge sync."""
        return await asyncio.to_thread(self._backend.count_tokens, texts)

    async def embed(self, texts: list[str], kind: TextKind = "query") -> list[Embedding]:
        """Embed texts; concurrent callers are batched together.

        Raises:
            InvalidRequestError: the model cannot read one of these texts (it read the others of its batch).
            DependencyUnavailableError: the model failed.

        """
        batch = self._batches[kind]
        embeddings: list[Embedding] = []
        for result in await asyncio.gather(*(batch(text) for text in texts)):
            if isinstance(result, ServiceError):
                raise result
            embeddings.append(result)
        return embeddings

    async def rerank(self, query: str, passages: list[str]) -> list[float]:
        """Cross-encoder relevance (0..1) of each passage to the query, in the passages' order.

        The passages of one query are one batch already, so no Serve batching here.

        Raises:
            DependencyUnavailableError: no cross-encoder is configured (embedder.reranker), or it failed.

        """
        reranker = self._reranker
        if reranker is None:
            raise DependencyUnavailableError("reranking was asked for but embedder.reranker names no cross-encoder")
        with tracer().start_as_current_span("embedder.rerank", attributes={"passages": len(passages)}):
            started = time.monotonic()
            scores = await self._run_reranker(reranker, query, passages)
            self._metrics.observe("cs_rerank_seconds", time.monotonic() - started, {})
            return scores

    async def _encode(self, texts: list[str], kind: TextKind) -> list[Embedding | ServiceError]:
        """Each text's embedding, or the error that is its caller's alone.

        An exception raised here would reach every caller of the batch, whatever tenant sent
        it; so when the batch fails, each text is encoded alone, and only those the model
        cannot read fail (returned, not raised: the batcher hands each caller its own item).
        """
        # The batcher runs this in the trace context of the batch's first request.
        with tracer().start_as_current_span("embedder.encode", attributes={"kind": kind, "batch_size": len(texts)}):
            started = time.monotonic()
            try:
                vectors: list[Embedding | ServiceError] = list(await self._run_model(texts, kind))
            except DependencyUnavailableError as err:
                if len(texts) == 1:
                    return [err]
                vectors = [await self._encode_alone(text, kind) for text in texts]
                if all(isinstance(v, ServiceError) for v in vectors):
                    return [err] * len(texts)  # nothing reads: the model is down, not one text bad
                vectors = [_unreadable(v) if isinstance(v, ServiceError) else v for v in vectors]
            self._metrics.observe("cs_embed_batch_seconds", time.monotonic() - started, {"kind": kind})
            self._metrics.observe("cs_embed_batch_size", len(texts), {"kind": kind})
            return vectors

    async def _encode_alone(self, text: str, kind: TextKind) -> Embedding | ServiceError:
        try:
            [vector] = await self._run_model([text], kind)
        except DependencyUnavailableError as err:
            return err
        return vector

    async def _run_model(self, texts: list[str], kind: TextKind) -> list[Embedding]:
        try:
            # The model call holds the GIL-free torch kernels; keep the event loop free.
            vectors = await asyncio.to_thread(self._backend.encode, texts, kind)
        except Exception as err:
            self._model_answered_at = None
            raise DependencyUnavailableError(f"embedding failed: {type(err).__name__}: {err}") from err
        self._model_answered_at = time.monotonic()
        return vectors

    async def _run_reranker(self, reranker: RerankingBackend, query: str, passages: list[str]) -> list[float]:
        try:
            scores = await asyncio.to_thread(reranker.score, query, passages)
        except Exception as err:
            self._reranker_answered_at = None
            raise DependencyUnavailableError(f"reranking failed: {type(err).__name__}: {err}") from err
        self._reranker_answered_at = time.monotonic()
        return scores

    def _answered_lately(self, answered_at: float | None) -> bool:
        return answered_at is not None and time.monotonic() - answered_at < self._health_model_check_s

    async def check_health(self) -> None:
        """Fail when the model cannot embed (or the cross-encoder score) a short text; not counted in the metrics.

        A model that answered within ``health_model_check_s`` is not asked again: a real
        call proves as much as the check's own text, and an idle replica then runs no
        forward pass for every probe. A real call that failed makes the next check ask.
        """
        if not self._answered_lately(self._model_answered_at):
            await self._run_model(["health"], "query")
        if self._reranker is not None and not self._answered_lately(self._reranker_answered_at):
            await self._run_reranker(self._reranker, "health", ["health"])


def _unreadable(err: ServiceError) -> InvalidRequestError:
    """The error of a text the model cannot read, while it read the rest of its batch."""
    logger.warning("one text of a batch could not be embedded: %s", err.message)  # the error, not the text
    return InvalidRequestError("the embedding model cannot read this text")


def build_embedder(config: EmbedderConfig, observability: ObservabilityConfig | None = None) -> Application:
    """Bind the Embedder deployment with its Serve options from config."""
    # FlagEmbedding (BGE-M3, the cross-encoder) imports pandas through the datasets library.
    uses_flagembedding = config.family == "bge-m3" or config.reranker is not None
    options = config.deployment.to_serve_options(uses_pandas=uses_flagembedding)
    deployment = serve.deployment(name="Embedder", **options)(Embedder)
    return deployment.bind(config, observability or ObservabilityConfig())
