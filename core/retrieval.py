"""Retrieval in one place: `retrieve(kb, query, k) -> list[Hit]` for the service, the UI and eval.

A Retriever loads the KB's index (written by `ingest`) and the embedder it was built with once,
and reloads when `index/current.json` changes on disk, e.g. after an upload. It takes no KB
lock: an index generation is immutable once current, so readers never see a partial write.
It is safe to call from several threads.
"""
from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kinject.core.kb import KB, KBError
from kinject.core.settings import Settings, load_settings


@dataclass
class Hit:
    doc_id: str
    title: str
    text: str
    score: float  # cosine similarity of query and chunk
    chunk_id: str
    page: int | None = None
    metadata: dict = field(default_factory=dict)


# ---- embedder -----------------------------------------------------------------------------
class Embedder:
    """A sentence-transformers model producing L2-normalized float32 vectors, run by torch or by
    ONNX Runtime (`backend`, see settings.models.embedder_backend)."""

    def __init__(self, ref: str, settings: Settings, backend: str | None = None):
        from kinject.core.models import embedder_backend, load_embedder
        from kinject.core.onnx_embedder import EMBEDDER_NUMERICS

        self.ref = ref
        self.backend = embedder_backend(settings, backend)
        self.numerics = EMBEDDER_NUMERICS[self.backend]  # backends with equal numerics make interchangeable vectors
        self.model = load_embedder(ref, settings, self.backend)
        if self.backend.startswith("onnx") and not hasattr(self.model, "session"):
            self.backend, self.numerics = "torch", "fp32"  # auto fell back: the model's pipeline has more than ONNX runs
        self.model.eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.max_seq_length = self.model.max_seq_length
        # A private tokenizer for counting: the model's own one changes state on every call.
        self.tokenizer = copy.deepcopy(self.model.tokenizer)
        self._lock = threading.Lock()

    def encode(
        self, texts: list[str], batch_size: int = 32, progress: bool = False, desc: str = "embedding", on_batch=None
    ) -> np.ndarray:
        """Vectors in input order. Texts are batched longest first, so batches carry little padding.

        `on_batch(rows, vectors)` is called after each batch (ingest checkpoints through it)."""
        import torch
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with tqdm(total=len(texts), desc=desc, unit="chunk", disable=not progress or not texts) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                with self._lock, torch.inference_mode():
                    vecs = self.model.encode(
                        [texts[i] for i in rows], batch_size=len(rows), normalize_embeddings=True, convert_to_numpy=True
                    )
                out[rows] = vecs
                if on_batch is not None:
                    on_batch(rows, vecs)
                bar.update(len(rows))
        return out


_embedders: dict[tuple[str, str, str], Embedder] = {}
_embedders_guard = threading.Lock()


def get_embedder(ref: str, settings: Settings, backend: str | None = None) -> Embedder:
    """One loaded embedder per (model, device, backend) in this process; `backend` defaults to
    the settings' one."""
    from kinject.core.models import embedder_backend, pick_device

    key = (ref, pick_device(settings.engine.device), embedder_backend(settings, backend))
    with _embedders_guard:
        if key not in _embedders:
            _embedders[key] = Embedder(ref, settings, key[2])
        return _embedders[key]


def index_backend(meta: dict, settings: Settings) -> str:
    """The embedder backend to query an index with: the settings' one when its vectors are
    interchangeable with the index's (same numerics: torch and onnx are), else one that makes the
    numerics the index was built with. An index from before backends were recorded is fp32."""
    from kinject.core.models import embedder_backend
    from kinject.core.onnx_embedder import EMBEDDER_NUMERICS

    wanted = embedder_backend(settings)
    built = meta.get("embedder_numerics", "fp32")
    if EMBEDDER_NUMERICS[wanted] == built:
        return wanted
    recorded = meta.get("embedder_backend")
    if EMBEDDER_NUMERICS.get(recorded) == built:
        return recorded
    if built == "fp32":
        return "torch" if embedder_backend(settings, "auto") == "torch" else "onnx"
    return "onnx-int8"


# ---- retriever ----------------------------------------------------------------------------
@dataclass
class _Loaded:
    stamp: tuple  # (inode, mtime) of current.json when loaded
    state: object  # kinject.core.index.IndexState
    embedder_ref: str


class Retriever:
    def __init__(self, kb: KB, settings: Settings):
        self.kb = kb
        self.settings = settings
        self.folder = kb.root / "index"
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()
        self._reranker = None
        self._reranker_lock = threading.Lock()

    # -- index ---------------------------------------------------------------------------
    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.folder / "current.json")
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _state(self):
        """The current index generation, loaded again only when current.json changed."""
        stamp = self._stamp()
        loaded = self._loaded
        if loaded is not None and loaded.stamp == stamp:
            return loaded.state
        with self._lock:
            if self._loaded is not None and self._loaded.stamp == stamp:
                return self._loaded.state
            from kinject.core.index import load_state

            for attempt in range(3):
                try:
                    state = load_state(self.folder, with_documents=False) if stamp else None
                    break
                except FileNotFoundError:  # two writes in a row removed the generation being read
                    if attempt == 2:
                        raise
                    stamp = self._stamp()
            if state is None:
                raise KBError(f"KB {self.kb.name!r} has no index yet: run `kinject ingest CORPUS --kb {self.kb.name}`")
            self._loaded = _Loaded(stamp, state, state.meta["embedder"])
            return state

    @property
    def embedder(self) -> Embedder:
        """The embedder the index was built with, on a backend whose vectors match the index's
        (the settings' embedder and backend before any ingest)."""
        try:
            meta = self._state().meta
        except KBError:
            return get_embedder(self.settings.models.embedder, self.settings)
        return get_embedder(meta["embedder"], self.settings, index_backend(meta, self.settings))

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        instruction = self.settings.models.query_instruction
        return self.embedder.encode([instruction + t for t in texts], batch_size=self.settings.ingest.embed_batch_size)

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts, batch_size=self.settings.ingest.embed_batch_size)

    # -- search --------------------------------------------------------------------------
    def search(self, query: str, k: int | None = None) -> list[Hit]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int | None = None) -> list[list[Hit]]:
        """Ranked hits for each query, best first; queries are embedded in one batch."""
        k = k or self.settings.retrieval.top_k
        state = self._state()
        reranking = bool(self.settings.models.reranker)
        depth = max(k, self.settings.retrieval.rerank_candidates) if reranking else k
        results = self.search_vectors(self.embed_queries(queries), depth, state)
        if reranking:
            results = [self._rerank(q, hits, k) for q, hits in zip(queries, results)]
        return results

    def search_vectors(self, vectors: np.ndarray, k: int, state=None) -> list[list[Hit]]:
        state = state or self._state()
        scores, ids = state.index.search(vectors, k, ef_search=self.settings.index.hnsw_ef_search)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, i in zip(row_scores, row_ids):
                rec = state.chunks.get(int(i))
                if rec is None:  # -1 (fewer than k), or an id a vector database has from a newer write
                    continue
                hits.append(
                    Hit(
                        doc_id=rec["doc_id"],
                        title=rec["title"],
                        text=rec["text"],
                        score=float(score),
                        chunk_id=rec["chunk_id"],
                        page=rec.get("page"),
                        metadata=dict(rec.get("metadata") or {}),
                    )
                )
            hits.sort(key=lambda h: (-h.score, h.chunk_id))  # equal scores in a stable order
            out.append(hits)
        return out

    # -- reranking -----------------------------------------------------------------------
    @property
    def reranker(self):
        """The cross-encoder named by settings.models.reranker, or None (the default: off)."""
        ref = self.settings.models.reranker
        if not ref:
            return None
        with self._lock:
            if self._reranker is None:
                from sentence_transformers import CrossEncoder

                from kinject.core.models import pick_device, resolve_model

                self._reranker = CrossEncoder(str(resolve_model(ref, self.settings)), device=pick_device(self.settings.engine.device))
        return self._reranker

    def _rerank(self, query: str, hits: list[Hit], k: int) -> list[Hit]:
        if not hits:
            return hits
        model = self.reranker
        with self._reranker_lock:
            scores = model.predict([(query, h.text) for h in hits], convert_to_numpy=True)
        for h, s in zip(hits, scores):
            h.metadata["rerank_score"] = float(s)
        return sorted(hits, key=lambda h: (-h.metadata["rerank_score"], h.chunk_id))[:k]


_retrievers: dict[tuple, Retriever] = {}
_retrievers_guard = threading.Lock()


def get_retriever(kb: KB, settings: Settings | None = None) -> Retriever:
    """The process-wide Retriever of a KB (one per KB path and retrieval-relevant settings)."""
    settings = settings or load_settings()
    key = (
        str(Path(kb.root).resolve()),
        settings.models.query_instruction,
        settings.models.reranker,
        settings.models.embedder_backend,
        settings.retrieval.top_k,
        settings.retrieval.rerank_candidates,
        settings.index.hnsw_ef_search,
        settings.engine.device,
    )
    with _retrievers_guard:
        if key not in _retrievers:
            _retrievers[key] = Retriever(kb, settings)
        return _retrievers[key]


def retrieve(kb: KB, query: str, k: int | None = None, settings: Settings | None = None) -> list[Hit]:
    return get_retriever(kb, settings).search(query, k)
