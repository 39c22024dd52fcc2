"""The Milvus backend (index.store=milvus, through llama-index's MilvusVectorStore), run on an
embedded milvus-lite file: ingest's incremental updates and deletes answer as on FAISS."""
from __future__ import annotations

import shutil

import pytest

from conftest import DEMO_CORPUS, assert_same_hits, copy_demo, demo_names, demo_questions, top_hits


def milvus(settings, **kw):
    return settings.model_copy(update={"index": settings.index.model_copy(update={"store": "milvus", **kw})})


def hits(kb, settings, queries):
    from kinject.core.retrieval import Retriever

    return top_hits(Retriever(kb, settings), queries)


def test_milvus_backend_follows_edits_and_deletes_like_faiss(tmp_path, settings):
    from kinject.core.index import load_state
    from kinject.core.kb import KB
    from kinject.ingest.pipeline import ingest

    names = demo_names(5)
    corpus = copy_demo(tmp_path / "corpus", names[:4])
    on_milvus = milvus(settings)
    kb_m, kb_f = KB.create(on_milvus, "on-milvus"), KB.create(settings, "on-faiss")
    ingest(kb_m, corpus, on_milvus, progress=False)
    ingest(kb_f, corpus, settings, progress=False)
    first = load_state(kb_m.root / "index")
    assert first.index.kind == "milvus" and (kb_m.root / "index" / "milvus.db").exists()
    assert not (kb_m.root / "index" / first.generation / "faiss.index").exists()

    changed, removed, added = names[0], names[1], names[4]
    (corpus / changed).write_text((corpus / changed).read_text() + "\n\nIn 1999 the archive moved to a new building on Quay Street.\n")
    (corpus / removed).unlink()
    shutil.copy(DEMO_CORPUS / added, corpus / added)
    rep_m = ingest(kb_m, corpus, on_milvus, progress=False)
    rep_f = ingest(kb_f, corpus, settings, progress=False)
    assert (rep_m.added, rep_m.changed, rep_m.removed) == (rep_f.added, rep_f.changed, rep_f.removed) == ([added], [changed], [removed])
    assert rep_m.chunks_embedded == rep_f.chunks_embedded and rep_m.fingerprint == rep_f.fingerprint

    state = load_state(kb_m.root / "index")
    # the collection holds exactly the generation's chunks: the replaced and removed ones are gone
    assert state.index.ids().tolist() == sorted(state.chunks) and len(state.index) == len(state.chunks) == rep_f.chunks
    queries = demo_questions(20) + ["archive moved to a new building on Quay Street"]
    on_m, on_f = hits(kb_m, on_milvus, queries), hits(kb_f, settings, queries)
    assert_same_hits(on_m, on_f)
    assert on_m[-1][0][0].startswith(changed) and not any(c.startswith(removed) for row in on_m for c, _ in row)
    assert ingest(kb_m, corpus, on_milvus, progress=False).status == "skipped"

    # faiss -> milvus: the vectors move into a new collection at the next ingest, nothing is embedded again
    moved = ingest(kb_f, corpus, on_milvus, progress=False)
    assert moved.status == "ran" and moved.chunks_embedded == 0 and f"moved {moved.chunks} vectors from faiss to milvus" in moved.reindexed
    assert load_state(kb_f.root / "index").index.kind == "milvus"
    assert_same_hits(hits(kb_f, on_milvus, queries), on_f)


def test_a_bad_milvus_uri_is_a_clear_settings_error():
    from kinject.core.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"index\.milvus_uri: expected empty"):
        load_settings({"index": {"store": "milvus", "milvus_uri": "localhost:19530"}})
