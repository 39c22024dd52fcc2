"""The vector index's type by size: exact flat below settings.index.flat_max_vectors, HNSW above,
with deletes that never come back in a search and survive a save and load."""
from __future__ import annotations

import numpy as np
import pytest

DIM = 32


def vectors(n: int, seed: int) -> np.ndarray:
    """Clustered unit vectors (topic centre + noise), as embeddings are; the centres are shared
    by every seed so that queries have near neighbours."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((20, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cfg(**kw):
    from kinject.core.settings import IndexSettings

    return IndexSettings(**{"flat_max_vectors": 500, "hnsw_m": 16, "hnsw_ef_construction": 40, "hnsw_ef_search": 64, **kw})


def exact_top(vecs: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found.tolist(), truth.tolist())]))


def test_small_indexes_stay_flat_and_exact_and_grow_into_hnsw_past_the_threshold():
    from kinject.core.index import VectorIndex

    c = cfg()
    index = VectorIndex.empty(DIM)
    data, queries = vectors(1200, 1), vectors(50, 2)
    index.add(np.arange(400), data[:400])
    assert index.fit(c) == "" and index.kind == "flat"
    # below the threshold: the exact scan, the same top 10 as brute force
    assert (index.search(queries, 10)[1] == exact_top(data[:400], np.arange(400), queries, 10)).mean() > 0.99

    index.add(np.arange(400, 1200), data[400:])
    assert index.fit(c) == "flat -> hnsw at 1200 vectors" and index.kind == "hnsw" and len(index) == 1200
    truth = exact_top(data, np.arange(1200), queries, 10)
    assert recall(index.search(queries, 10, ef_search=64)[1], truth) >= 0.95
    assert np.allclose(index.reconstruct([5, 1199]), data[[5, 1199]])

    index.remove(range(0, 800))  # 800 deleted of 1200: rebuilt, and flat again at 400 vectors
    assert index.fit(c) == "hnsw -> flat at 400 vectors" and index.kind == "flat"
    assert sorted(index.ids().tolist()) == list(range(800, 1200))
    assert (index.search(queries, 10)[1] == exact_top(data[800:], np.arange(800, 1200), queries, 10)).mean() > 0.99


def test_deleted_ids_never_come_back_from_hnsw_even_after_a_save_and_load(tmp_path):
    from kinject.core.index import VectorIndex

    c = cfg(flat_max_vectors=0, max_deleted_fraction=0.5)
    data = vectors(1000, 3)
    index = VectorIndex.empty(DIM)
    index.add(np.arange(1000) + 10, data)
    index.fit(c)
    gone = np.arange(10, 110)
    assert index.remove(gone) == 100 and index.remove([10, 5]) == 0  # deleted or never there
    assert index.fit(c) == "" and index.kind == "hnsw"  # 10 % deleted: kept in the graph, skipped
    for loaded in (index, (index.save(tmp_path / "faiss.index"), VectorIndex.load(tmp_path / "faiss.index"))[1]):
        # each deleted vector, searched for itself, is its own best match in the graph
        _, found = loaded.search(data[:100], 10, ef_search=64)
        assert not set(found.ravel().tolist()) & set(gone.tolist())
        assert (found >= 0).all() and len(loaded) == 900
        assert set(loaded.ids().tolist()) == set(range(110, 1010))
    with pytest.raises(ValueError, match="never reused"):
        index.add(np.array([10]), data[:1])


def test_hnsw_is_rebuilt_without_its_deleted_vectors_past_the_fraction_and_on_a_new_m():
    from kinject.core.index import VectorIndex

    c = cfg(flat_max_vectors=0, max_deleted_fraction=0.1)
    data = vectors(1000, 4)
    index = VectorIndex.empty(DIM)
    index.add(np.arange(1000), data)
    index.fit(c)
    index.remove(range(50))
    assert index.fit(c) == "" and index.faiss.ntotal == 1000
    index.remove(range(50, 150))
    assert index.fit(c) == "150 deleted of 1000 vectors"
    assert index.faiss.ntotal == len(index) == 850 and not index._deleted
    assert np.allclose(index.reconstruct([150, 999]), data[[150, 999]])
    assert index.fit(cfg(flat_max_vectors=0, hnsw_m=8)) == "hnsw M 16 -> 8" and len(index) == 850


def test_an_unknown_index_kind_is_a_clear_settings_error():
    from kinject.core.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"index\.kind.*'auto', 'flat' or 'hnsw'"):
        load_settings({"index": {"kind": "ivf"}})
