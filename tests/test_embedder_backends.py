"""Embedder backends: torch, ONNX Runtime fp32 and ONNX Runtime int8 (the default on CPU), on the
bundled MiniLM. The ONNX export is made once from the local weights into the cache; fp32 vectors
are interchangeable with torch's, int8 ones are not, so an index records its numerics and a
mismatch is re-embedded on ingest and never mixed at query time."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import REPO

TEXTS = [
    "The archive moved to a new building on Quay Street in 1999.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "short",
    " ".join(["A long sentence about the harbour and its ships"] * 60),  # past 256 tokens: truncated
]


def backend_settings(settings, backend: str):
    return settings.model_copy(update={"models": settings.models.model_copy(update={"embedder_backend": backend})})


def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in sorted(p.name for p in (REPO / "demo" / "corpus").iterdir())[:3]:
        (folder / name).write_text((REPO / "demo" / "corpus" / name).read_text())
    return folder


def test_backend_setting_resolves_and_validates(settings):
    from kinject.core.models import embedder_backend
    from kinject.core.settings import SettingsError, load_settings

    assert settings.models.embedder_backend == "auto"
    assert embedder_backend(settings) == "onnx-int8"  # CPU here
    on_cuda = settings.model_copy(update={"engine": settings.engine.model_copy(update={"device": "cuda"})})
    assert embedder_backend(on_cuda) == "torch"
    assert embedder_backend(backend_settings(settings, "onnx-int8")) == "onnx-int8"
    assert load_settings({"models": {"embedder_backend": "torch"}}).models.embedder_backend == "torch"
    with pytest.raises(SettingsError, match="models.embedder_backend"):
        load_settings({"models": {"embedder_backend": "tensorrt"}})


def test_onnx_fp32_vectors_agree_with_torch_and_int8_ones_are_close(settings):
    from kinject.core.retrieval import get_embedder

    torch_e = get_embedder("minilm-l6", settings, "torch")
    onnx_e = get_embedder("minilm-l6", settings, "onnx")
    int8_e = get_embedder("minilm-l6", settings, "onnx-int8")
    assert (torch_e.numerics, onnx_e.numerics, int8_e.numerics) == ("fp32", "fp32", "int8")
    assert torch_e.dim == onnx_e.dim == int8_e.dim == 384
    assert torch_e.max_seq_length == onnx_e.max_seq_length == int8_e.max_seq_length == 256
    ref, fp32, int8 = (e.encode(TEXTS, batch_size=2) for e in (torch_e, onnx_e, int8_e))
    assert np.allclose(np.linalg.norm(fp32, axis=1), 1, atol=1e-5)
    assert (ref * fp32).sum(1).min() > 0.9999  # interchangeable with torch's
    cos8 = (ref * int8).sum(1)
    assert cos8.min() > 0.95 and cos8.min() < 0.9999  # close, but other vectors
    # deterministic, and independent of the batch a text lands in
    assert np.array_equal(onnx_e.encode(TEXTS, batch_size=2), fp32)
    assert np.abs(onnx_e.encode(TEXTS, batch_size=4) - fp32).max() < 1e-5


def test_export_is_cached_atomically_in_the_cache_dir(tmp_path):
    from kinject.core.models import resolve_model
    from kinject.core.onnx_embedder import export_onnx
    from kinject.core.settings import load_settings

    folder = resolve_model("minilm-l6", load_settings())
    cache = tmp_path / "cache"
    path = export_onnx(folder, cache, "fp32")
    assert path.is_file() and path.parent.parent == cache / "onnx" and "fp32" in path.parent.name
    assert json.loads((path.parent / "kinject-source.json").read_text())["precision"] == "fp32"
    stamp = os.stat(path).st_mtime_ns
    assert export_onnx(folder, cache, "fp32") == path and os.stat(path).st_mtime_ns == stamp  # not exported again
    # nothing half-written is left beside it
    assert not [p for p in (cache / "onnx").iterdir() if p.name.endswith(".tmp")]


def test_a_pipeline_the_onnx_runner_cannot_reproduce_is_refused(tmp_path):
    from kinject.core.onnx_embedder import OnnxUnsupported, pipeline_config

    folder = tmp_path / "st"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    assert pipeline_config(folder)["pooling"] == "mean"
    (folder / "modules.json").write_text(json.dumps([*modules, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(OnnxUnsupported, match="embedder_backend=torch"):
        pipeline_config(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(OnnxUnsupported, match="mean or CLS"):
        pipeline_config(folder)


def test_torch_and_onnx_share_an_index_but_int8_is_re_embedded(tmp_path, settings):
    from kinject.core.index import load_state
    from kinject.core.kb import KB
    from kinject.core.retrieval import Retriever
    from kinject.ingest.pipeline import ingest

    docs = corpus(tmp_path)
    torch_s, onnx_s, int8_s = (backend_settings(settings, b) for b in ("torch", "onnx", "onnx-int8"))
    kb = KB.create(torch_s, "kb")
    first = ingest(kb, docs, torch_s, progress=False)
    meta = load_state(kb.root / "index").meta
    assert (meta["embedder_backend"], meta["embedder_numerics"]) == ("torch", "fp32")
    assert kb.stage("ingest")["build"]["embedder_backend"] == "torch"  # the manifest records it

    # fp32 onnx over a torch index: compatible, nothing re-embedded, same fingerprint; its queries
    # rank the same chunks with the same scores
    again = ingest(kb, docs, onnx_s, progress=False)
    assert again.status == "skipped" and again.chunks_embedded == 0 and not again.rebuilt
    assert again.fingerprint == first.fingerprint
    queries = ["When did the archive move?", "What does photosynthesis make?", "harbour ships"]
    by_torch = Retriever(kb, torch_s).search_many(queries, 5)
    by_onnx = Retriever(kb, onnx_s).search_many(queries, 5)
    for a, b in zip(by_torch, by_onnx):
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-4)

    # int8: other numerics, so the whole index is embedded again and the fingerprint changes
    rebuilt = ingest(kb, docs, int8_s, progress=False)
    assert "embedder_numerics (fp32 -> int8)" in rebuilt.rebuilt
    assert rebuilt.chunks_embedded == rebuilt.chunks == first.chunks
    assert rebuilt.fingerprint != first.fingerprint
    meta = load_state(kb.root / "index").meta
    assert (meta["embedder_backend"], meta["embedder_numerics"]) == ("onnx-int8", "int8")

    # a query with torch settings over the int8 index is embedded with int8, never mixed
    retriever = Retriever(kb, torch_s)
    assert retriever.embedder.backend == "onnx-int8"
    int8_hits = Retriever(kb, int8_s).search_many(queries, 5)
    for a, b in zip(retriever.search_many(queries, 5), int8_hits):
        assert [(h.chunk_id, round(h.score, 5)) for h in a] == [(h.chunk_id, round(h.score, 5)) for h in b]

    # and back to fp32: re-embedded again
    back = ingest(kb, docs, onnx_s, progress=False)
    assert "embedder_numerics (int8 -> fp32)" in back.rebuilt and back.fingerprint == first.fingerprint


def test_an_index_from_before_backends_were_recorded_counts_as_fp32(tmp_path, settings):
    """Indexes written before this setting have neither key: they stay valid (no re-embedding,
    same fingerprint), so upgrading keeps a KB's later stages fresh."""
    from kinject.core.index import load_state, write_state
    from kinject.core.kb import KB
    from kinject.core.retrieval import Retriever, index_backend
    from kinject.ingest.pipeline import fingerprint, ingest

    docs = corpus(tmp_path)
    kb = KB.create(settings, "old")
    first = ingest(kb, docs, backend_settings(settings, "torch"), progress=False)
    state = load_state(kb.root / "index")
    drop = lambda d: {k: v for k, v in d.items() if k not in ("embedder_backend", "embedder_numerics")}
    assert fingerprint(state.documents, drop(kb.stage("ingest")["build"])) == first.fingerprint
    legacy = drop(state.meta)
    state.meta = legacy
    write_state(kb.root / "index", state)
    assert index_backend(legacy, settings) == "onnx"
    assert index_backend(legacy, backend_settings(settings, "onnx-int8")) == "onnx"  # fp32 index: fp32 queries
    again = ingest(kb, docs, settings, progress=False)
    assert again.status == "skipped" and not again.rebuilt and again.fingerprint == first.fingerprint
    assert Retriever(kb, backend_settings(settings, "onnx-int8")).embedder.numerics == "fp32"


def test_auto_builds_new_indexes_in_int8_and_keeps_an_existing_fp32_one(tmp_path, settings):
    """A new default must not re-embed a KB built before it (that would make its later stages
    stale); a backend set by name still does."""
    from kinject.core.index import load_state
    from kinject.core.kb import KB
    from kinject.ingest.pipeline import ingest

    docs = corpus(tmp_path)
    fresh = KB.create(settings, "fresh")
    ingest(fresh, docs, settings, progress=False)
    assert load_state(fresh.root / "index").meta["embedder_numerics"] == "int8"

    kb = KB.create(settings, "fp32")
    first = ingest(kb, docs, backend_settings(settings, "onnx"), progress=False)
    again = ingest(kb, docs, settings, progress=False)
    assert again.status == "skipped" and not again.rebuilt and again.fingerprint == first.fingerprint
    assert load_state(kb.root / "index").meta["embedder_numerics"] == "fp32"
    named = ingest(kb, docs, backend_settings(settings, "onnx-int8"), progress=False)
    assert "embedder_numerics (fp32 -> int8)" in named.rebuilt


def test_auto_falls_back_to_torch_for_a_pipeline_onnx_does_not_run(tmp_path, settings):
    """Max pooling: sentence-transformers runs it, the ONNX runner does not. `auto` uses torch
    for it; an explicit `onnx` says why it cannot."""
    from kinject.core.models import resolve_model
    from kinject.core.onnx_embedder import OnnxUnsupported
    from kinject.core.retrieval import Embedder

    src = resolve_model("minilm-l6", settings)
    folder = tmp_path / "maxpool"
    folder.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (folder / p.name).symlink_to(p)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, "pooling_mode_max_tokens": True}))
    auto = Embedder(str(folder), settings)
    assert auto.backend == "torch" and auto.numerics == "fp32" and auto.encode(TEXTS[:2]).shape == (2, 384)
    with pytest.raises(OnnxUnsupported, match="mean or CLS"):
        Embedder(str(folder), backend_settings(settings, "onnx"))

    # the index records the vectors torch made, so the next ingest finds nothing to redo
    from kinject.core.index import load_state
    from kinject.core.kb import KB
    from kinject.ingest.pipeline import ingest

    maxpool = settings.model_copy(update={"models": settings.models.model_copy(update={"embedder": str(folder)})})
    kb = KB.create(maxpool, "maxpool")
    ingest(kb, corpus(tmp_path), maxpool, progress=False)
    meta = load_state(kb.root / "index").meta
    assert (meta["embedder_backend"], meta["embedder_numerics"]) == ("torch", "fp32")
    assert ingest(kb, tmp_path / "corpus", maxpool, progress=False).status == "skipped"
