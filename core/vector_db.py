"""The KB's vectors in a vector database instead of a FAISS file: Milvus, through llama-index's
`MilvusVectorStore`, for corpora past one machine.

`index.milvus_uri` picks the server: empty (the default) is an embedded milvus-lite file,
`milvus.db` in the KB's index folder; a path ending in `.db` is a milvus-lite file elsewhere;
`http://host:19530` is a Milvus server or cluster, with the same client code. MilvusIndex has
VectorIndex's interface, so ingest's incremental updates and deletes and the Retriever's search
run on it unchanged; chunk and document records stay in the index generations on disk.

The collection is mutated in place, so a generation written on Milvus is immutable only in its
records: a reader still on the previous generation may find ids it does not know (skipped) or
miss deleted ones until it reloads. Ids are never reused and vectors are upserted by id, so an
ingest that crashed half-way and runs again writes the same ids over its own leftovers.
Each from-scratch build (a new embedder, say) writes a fresh collection and drops the one it
replaces once the new generation is current. milvus-lite is an embedded store for one process;
ingest and serve as two processes on one milvus-lite file are untested: use a Milvus server.
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
from pathlib import Path

import numpy as np

STORE_FILE = "milvus.json"
LITE_FILE = "milvus.db"


class MilvusIndex:
    kind = "milvus"
    store_name = "milvus"
    FILE = STORE_FILE  # what a generation folder holds instead of faiss.index

    def __init__(self, uri: str, collection: str, dim: int, count: int, token: str = "", folder: Path | None = None):
        self.uri, self.collection, self._dim, self._count, self.token = uri, collection, dim, count, token
        self.folder = folder  # the KB's index folder, where a relative milvus-lite file lives
        self._store = None
        self._lock = threading.Lock()  # one connection set-up; milvus-lite calls one at a time

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg, folder: Path, dim: int, label: str) -> "MilvusIndex":
        """A new, empty collection named after the KB (`label`) with a random suffix."""
        base = re.sub(r"[^0-9A-Za-z_]", "_", f"{cfg.milvus_collection_prefix}_{label}")
        uri = cfg.milvus_uri or LITE_FILE  # the default file is named relative to the index folder, so it moves with the KB
        if cfg.milvus_uri and "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())  # a file the user named: relative to where they are
        index = cls(uri, f"{base}_{secrets.token_hex(4)}", dim, 0, cfg.milvus_token.get_secret_value(), folder)
        index.store  # creates the collection now: a bad uri fails before anything is embedded
        return index

    @classmethod
    def load(cls, path: Path) -> "MilvusIndex":
        from kinject.core.settings import load_settings

        rec = json.loads(Path(path).read_text())
        token = load_settings().index.milvus_token.get_secret_value()  # a secret: never in the file
        return cls(rec["uri"], rec["collection"], rec["dim"], rec["count"], token, Path(path).parent.parent)

    def save(self, path: Path) -> None:
        from kinject.core.files import atomic_write_json

        atomic_write_json(Path(path), {"uri": self.uri, "collection": self.collection, "dim": self._dim, "count": self._count})

    @property
    def lite(self) -> bool:
        return "://" not in self.uri

    def resolved_uri(self) -> str:
        if "://" in self.uri or Path(self.uri).is_absolute() or self.folder is None:
            return self.uri
        return str(Path(self.folder) / self.uri)  # milvus-lite file relative to the index folder

    @property
    def store(self):
        """The llama-index store (and its MilvusClient as `.client`), connected on first use."""
        with self._lock:
            return self._connect()

    def _connect(self):
        if self._store is None:
            from llama_index.vector_stores.milvus import MilvusVectorStore

            try:
                self._store = MilvusVectorStore(
                    uri=self.resolved_uri(),
                    token=self.token,
                    collection_name=self.collection,
                    dim=self._dim,
                    similarity_metric="IP",  # normalized vectors: inner product = cosine, as in FAISS
                    upsert_mode=True,  # a rerun after a crash writes its ids over the leftovers
                    overwrite=False,
                    consistency_level="Strong",  # a search sees every write before it
                )
            except Exception as e:
                from kinject.core.errors import KinjectError

                raise KinjectError(f"cannot open Milvus collection {self.collection!r} at {self.resolved_uri()}: {e}") from e
        return self._store

    # -- VectorIndex's interface ------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self._count

    def ids(self) -> np.ndarray:
        it = self.store.client.query_iterator(self.collection, filter="", output_fields=["id"], batch_size=1000)
        out = []
        while page := it.next():
            out += [int(r["id"]) for r in page]
        it.close()
        return np.array(sorted(out), dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        from llama_index.core.schema import TextNode

        if not len(ids):
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        # Text and records stay in the generation's chunks.jsonl; the store keeps id and vector.
        self.store.add([TextNode(id_=str(int(i)), text="", embedding=v.tolist()) for i, v in zip(ids, vectors)])
        self._count += len(ids)

    def remove(self, ids) -> int:
        ids = [str(int(i)) for i in ids]
        if not ids:
            return 0
        self.store.delete_nodes(node_ids=ids)
        self._count -= len(ids)
        return len(ids)

    def reconstruct(self, ids) -> np.ndarray:
        if not len(ids):
            return np.zeros((0, self._dim), np.float32)
        rows = {int(r["id"]): r["embedding"] for r in self.store.client.get(self.collection, ids=[str(int(i)) for i in ids], output_fields=["embedding"])}
        return np.array([rows[int(i)] for i in ids], dtype=np.float32)

    reconstruct_all = reconstruct

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), -1 where fewer than k; the server picks its index."""
        from llama_index.core.vector_stores import VectorStoreQuery

        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self._dim)
        k = min(k, max(self._count, 1))
        scores, ids = np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        store = self.store
        # the embedded server is not known to be thread-safe; the service searches from several threads
        one_at_a_time = self._lock if self.lite else contextlib.nullcontext()
        for row, q in enumerate(queries):
            with one_at_a_time:
                res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=k))
            n = len(res.ids or [])
            ids[row, :n] = [int(i) for i in res.ids]
            scores[row, :n] = res.similarities
        return scores, ids

    def fit(self, cfg) -> str:
        return ""  # the server builds and tunes its own index

    def drop(self) -> None:
        """Remove the collection (after a generation that no longer uses it became current)."""
        self.store.client.drop_collection(self.collection)
        self._store = None


def milvus_available() -> bool:
    try:
        import llama_index.vector_stores.milvus  # noqa: F401
    except ImportError:
        return False
    return True


def require_milvus() -> None:
    if not milvus_available():
        from kinject.core.errors import KinjectError

        raise KinjectError("index.store=milvus needs the milvus extra: pip install 'kinject[milvus]' (llama-index-vector-stores-milvus, pymilvus, milvus-lite)")
