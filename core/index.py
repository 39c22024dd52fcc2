"""The KB's vector index on disk: FAISS inner-product vectors plus the chunk and document records.

Vectors live in a `faiss.IndexIDMap2` held by llama-index's `FaissVectorStore`, which persists and
loads it. Deletes are ours: that store cannot delete, and its map variant reuses ids (`ntotal`)
after a delete. Every chunk gets a fresh int64 id from a counter kept in meta.json, so replacing
a document removes exactly its ids and adds new ones.

What the map wraps is chosen by size (settings.index): an exact `IndexFlatIP` up to
`flat_max_vectors`, an HNSW graph above, where a flat scan of every vector per query is too slow.
FAISS cannot remove a vector from an HNSW graph, so a delete there leaves the vector in place and
records its id as deleted (`faiss.deleted.npy` beside the index); searches skip deleted ids, and
the graph is rebuilt from the live vectors once they pass `max_deleted_fraction`.

Layout inside the KB's index/ folder: each write makes a new generation folder
`gNNNNNN/` (faiss.index, chunks.jsonl, documents.jsonl, meta.json), and only then points
`current.json` at it. With index.store=milvus the vectors live in a Milvus collection instead
(core/vector_db.py) and `milvus.json` takes faiss.index's place. A crash leaves the previous
generation current; readers never see a half-written index. The previous generation is kept for
readers that are still loading it.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kinject.core.files import atomic_dir, atomic_write_json, atomic_write_text, read_jsonl, sha256_text


@dataclass
class Document:
    doc_id: str
    title: str
    text: str  # normalized text
    source: str
    content_hash: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.content_hash:
            self.content_hash = content_hash(self.title, self.text, self.metadata)

    def to_json(self) -> dict:
        return asdict(self)


def content_hash(title: str, text: str, metadata: dict) -> str:
    return sha256_text(json.dumps([title, text, metadata], sort_keys=True, ensure_ascii=False))


CURRENT = "current.json"
FAISS_FILE = "faiss.index"
DELETED_FILE = "faiss.deleted.npy"  # ids deleted from an HNSW graph that still holds their vectors
CHUNKS_FILE = "chunks.jsonl"
DOCUMENTS_FILE = "documents.jsonl"
META_FILE = "meta.json"


def _gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@contextmanager
def _one_thread_per_search():
    """One OpenMP thread per FAISS search. The service searches from several threads at once,
    and a flat scan of one query is memory-bound: an OpenMP team per query only adds spinning
    (on a busy 2-core machine it made single-query latency several times worse). The setting is
    the calling thread's and torch shares it, so it is restored after the search: left at 1, it
    made training and generation in the same thread run on one core."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class VectorIndex:
    """Normalized vectors by int64 id; inner product = cosine similarity. faiss-gpu searches a flat
    index on GPU."""

    store_name = "faiss"
    FILE = FAISS_FILE

    def __init__(self, store, deleted=()):
        self.store = store  # llama_index.vector_stores.faiss.FaissVectorStore
        self._gpu = None
        self._deleted: set[int] = {int(i) for i in deleted}  # HNSW only: ids searches must skip
        self._skip = None  # the faiss selector of _deleted, built once per change

    @classmethod
    def empty(cls, dim: int) -> "VectorIndex":
        import faiss

        return cls.wrap(faiss.IndexFlatIP(dim))

    @classmethod
    def wrap(cls, inner, deleted=()) -> "VectorIndex":
        import faiss
        from llama_index.vector_stores.faiss import FaissVectorStore

        return cls(FaissVectorStore(faiss_index=faiss.IndexIDMap2(inner)), deleted)

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        from llama_index.vector_stores.faiss import FaissVectorStore

        tombstones = Path(path).with_name(DELETED_FILE)
        deleted = np.load(tombstones).tolist() if tombstones.exists() else ()
        return cls(FaissVectorStore.from_persist_path(str(path)), deleted)

    @property
    def faiss(self):
        return self.store.client

    @property
    def inner(self):
        import faiss

        return faiss.downcast_index(self.faiss.index)

    @property
    def kind(self) -> str:
        import faiss

        return "hnsw" if isinstance(self.inner, faiss.IndexHNSW) else "flat"

    @property
    def dim(self) -> int:
        return self.faiss.d

    def __len__(self) -> int:
        return self.faiss.ntotal - len(self._deleted)

    def ids(self) -> np.ndarray:
        import faiss

        ids = faiss.vector_to_array(self.faiss.id_map).astype(np.int64)
        return ids[~np.isin(ids, self._deleted_ids())] if self._deleted else ids

    def _deleted_ids(self) -> np.ndarray:
        return np.fromiter(self._deleted, np.int64, len(self._deleted))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            ids = np.asarray(ids, dtype=np.int64)
            if self._deleted.intersection(ids.tolist()):
                raise ValueError("an id deleted from this index cannot be added again; ids are never reused")
            self.faiss.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
            self._gpu = None

    def remove(self, ids) -> int:
        ids = np.asarray(list(ids), dtype=np.int64)
        if not len(ids):
            return 0
        self._gpu = None
        if self.kind == "flat":
            return int(self.faiss.remove_ids(ids))
        present = set(self.ids().tolist()).intersection(ids.tolist())
        self._deleted |= present
        self._skip = None
        return len(present)

    def reconstruct(self, ids) -> np.ndarray:
        return np.stack([self.faiss.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k); ids are -1 where the index has fewer than k vectors.
        `ef_search`: the HNSW candidate list (at least k); the graph's own value when None."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, max(len(self), 1))
        with _one_thread_per_search():
            if self.kind == "flat":
                return self._searcher().search(queries, k)
            # Parameters per call: the map swaps its selector into them while it searches.
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(ef_search or self.inner.hnsw.efSearch, k)
            if self._deleted:
                params.sel = self._selector()
            return self.faiss.search(queries, k, params=params)

    def _selector(self):
        import faiss

        if self._skip is None:
            batch = faiss.IDSelectorBatch(self._deleted_ids())
            skip = faiss.IDSelectorNot(batch)
            skip._batch = batch  # IDSelectorNot does not own what it negates
            self._skip = skip
        return self._skip

    def _searcher(self):
        if self._gpu is None and _gpu_count() > 0 and len(self) > 0:
            import faiss

            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.faiss)
            except Exception:  # an index type the GPU cloner does not know: search on CPU
                self._gpu = self.faiss
        return self._gpu or self.faiss

    # -- the index type, by size ---------------------------------------------------------
    def wanted_kind(self, cfg) -> str:
        """`cfg`: settings.index. Flat (exact) up to cfg.flat_max_vectors live vectors, else HNSW."""
        if cfg.kind != "auto":
            return cfg.kind
        return "flat" if len(self) <= cfg.flat_max_vectors else "hnsw"

    def fit(self, cfg) -> str:
        """Rebuild the index as the type `cfg` wants for its size, or to drop deleted vectors once
        they are more than cfg.max_deleted_fraction of the graph. Returns why it rebuilt ("" when
        it did not). Ids, vectors and search results of a flat index are unchanged by a no-op."""
        kind = self.wanted_kind(cfg)
        if kind != self.kind:
            why = f"{self.kind} -> {kind} at {len(self)} vectors"
        elif kind == "hnsw" and self.inner.hnsw.nb_neighbors(1) != cfg.hnsw_m:
            why = f"hnsw M {self.inner.hnsw.nb_neighbors(1)} -> {cfg.hnsw_m}"
        elif kind == "hnsw" and self._deleted and len(self._deleted) > cfg.max_deleted_fraction * self.faiss.ntotal:
            why = f"{len(self._deleted)} deleted of {self.faiss.ntotal} vectors"
        else:
            if kind == "hnsw":
                self.inner.hnsw.efSearch = cfg.hnsw_ef_search
            return ""
        self._rebuild(kind, cfg)
        return why

    def _rebuild(self, kind: str, cfg) -> None:
        import faiss

        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = cfg.hnsw_ef_construction
            inner.hnsw.efSearch = cfg.hnsw_ef_search
        fresh = VectorIndex.wrap(inner)
        # Straight from the old storage, a slice at a time: no second copy of every vector.
        ids, stored = faiss.vector_to_array(self.faiss.id_map), self._stored()
        live = ~np.isin(ids, self._deleted_ids()) if self._deleted else None
        for start in range(0, len(ids), 65_536):
            part, rows = ids[start : start + 65_536], stored[start : start + 65_536]
            if live is not None:
                keep = live[start : start + 65_536]
                part, rows = part[keep], rows[keep]
            fresh.add(part, rows)
        self.store, self._deleted, self._skip, self._gpu = fresh.store, set(), None, None

    def _stored(self) -> np.ndarray:
        """Every stored vector, in the map's order, as a read-only view of the FAISS storage."""
        import faiss

        inner = self.inner
        storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
        every = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * self.dim).reshape(storage.ntotal, self.dim)
        every.flags.writeable = False
        return every

    def reconstruct_all(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of `ids` in that order, read in one pass over the storage."""
        import faiss

        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        every = self._stored()
        position = {int(i): n for n, i in enumerate(faiss.vector_to_array(self.faiss.id_map))}
        return np.array(every[[position[int(i)] for i in ids]], dtype=np.float32)

    def save(self, path: Path) -> None:
        self.store.persist(str(path))  # the CPU index; a GPU copy is rebuilt on load
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        if self._deleted:
            tombstones = Path(path).with_name(DELETED_FILE)
            with open(tombstones, "wb") as f:
                np.save(f, np.array(sorted(self._deleted), dtype=np.int64))
                f.flush()
                os.fsync(f.fileno())


def new_index(cfg, folder: Path, dim: int, label: str):
    """An empty index in the store settings.index names: a FAISS file in the KB's index folder
    (`folder`), or a fresh Milvus collection named after the KB (`label`)."""
    if cfg.store == "milvus":
        from kinject.core.vector_db import MilvusIndex, require_milvus

        require_milvus()
        return MilvusIndex.create(cfg, folder, dim, label)
    return VectorIndex.empty(dim)


def fit_index(index, cfg, folder: Path, label: str) -> tuple[object, str, object | None]:
    """(index, why it changed or "", the index it replaced or None): moved into the store
    cfg.store names when it is in another one, then rebuilt as the type cfg wants for its size."""
    moved, replaced = "", None
    if index.store_name != cfg.store:
        fresh = new_index(cfg, folder, index.dim, label)
        ids = index.ids()
        every = index.reconstruct_all(ids) if isinstance(index, VectorIndex) else None  # one pass over a FAISS file
        for start in range(0, len(ids), 10_000):
            part = ids[start : start + 10_000]
            fresh.add(part, every[start : start + 10_000] if every is not None else index.reconstruct_all(part))
        moved, replaced, index = f"moved {len(ids)} vectors from {index.store_name} to {cfg.store}", index, fresh
    refit = index.fit(cfg)
    return index, "; ".join(filter(None, [moved, refit])), replaced


def load_index(gen_dir: Path):
    """A generation's index: a FAISS file, or the Milvus collection its milvus.json names."""
    from kinject.core.vector_db import STORE_FILE, MilvusIndex

    if (gen_dir / STORE_FILE).exists():
        return MilvusIndex.load(gen_dir / STORE_FILE)
    if not (gen_dir / FAISS_FILE).exists():
        raise FileNotFoundError(f"{gen_dir / FAISS_FILE} disappeared while loading")
    return VectorIndex.load(gen_dir / FAISS_FILE)


@dataclass
class IndexState:
    """One generation of the index, fully in memory."""

    meta: dict
    index: VectorIndex | None  # or a MilvusIndex; None until the embedder's dimension is known
    chunks: dict[int, dict]  # faiss id -> chunk record
    documents: dict[str, Document] = field(default_factory=dict)
    generation: str | None = None


def current_generation(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / CURRENT).read_text())["generation"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def read_meta(folder: Path) -> dict | None:
    gen = current_generation(folder)
    if gen is None:
        return None
    return json.loads((Path(folder) / gen / META_FILE).read_text())


def read_documents(folder: Path) -> list[Document]:
    gen = current_generation(folder)
    if gen is None:
        return []
    return [Document(**rec) for rec in read_jsonl(Path(folder) / gen / DOCUMENTS_FILE)]


def load_documents(kb) -> list[Document]:
    """The KB's ingested documents (normalized text), as stored in its index folder."""
    return read_documents(kb.root / "index")


def read_chunks(gen_dir: Path) -> dict[int, dict]:
    return {rec["id"]: rec for rec in read_jsonl(gen_dir / CHUNKS_FILE)}


def load_state(folder: Path, with_documents: bool = True) -> IndexState | None:
    """The current generation, or None when nothing was indexed yet."""
    gen = current_generation(folder)
    if gen is None:
        return None
    gen_dir = Path(folder) / gen
    meta = json.loads((gen_dir / META_FILE).read_text())
    index = load_index(gen_dir)
    docs = {d.doc_id: d for d in (Document(**r) for r in read_jsonl(gen_dir / DOCUMENTS_FILE))} if with_documents else {}
    chunks = read_chunks(gen_dir)
    if len(chunks) != len(index) or not gen_dir.exists():
        raise FileNotFoundError(f"{gen_dir} changed while loading")
    return IndexState(meta=meta, index=index, chunks=chunks, documents=docs, generation=gen)


def write_state(folder: Path, state: IndexState) -> str:
    """Write a new generation, then make it current. Returns the generation's name."""
    folder = Path(folder)
    previous = current_generation(folder)
    number = int(previous[1:]) + 1 if previous else 1
    gen = f"g{number:06d}"
    with atomic_dir(folder / gen) as tmp:
        state.index.save(tmp / state.index.FILE)
        atomic_write_text(tmp / CHUNKS_FILE, "".join(json.dumps(state.chunks[i], ensure_ascii=False) + "\n" for i in sorted(state.chunks)))
        atomic_write_text(tmp / DOCUMENTS_FILE, "".join(json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in state.documents.values()))
        atomic_write_json(tmp / META_FILE, state.meta)
    atomic_write_json(folder / CURRENT, {"generation": gen})
    state.generation = gen
    _clean(folder, keep={gen, previous})
    return gen


def _clean(folder: Path, keep: set[str | None]) -> None:
    """Drop generations older than the previous one and temp folders left by a crash."""
    for p in folder.iterdir():
        old_generation = p.is_dir() and p.name.startswith("g") and p.name[1:].isdigit() and p.name not in keep
        crash_leftover = p.name.startswith(".") and (p.name.endswith(".tmp") or ".old." in p.name)
        if old_generation or crash_leftover:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
