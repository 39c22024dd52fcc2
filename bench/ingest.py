"""Ingest and retrieval speed: kinject against llama-index's defaults, same inputs, one run.

Embedding: kinject's `ingest()` vs `VectorStoreIndex.from_documents` with `HuggingFaceEmbedding`
pointed at the same bundled MiniLM folder (nothing downloads), every other llama-index setting at
its default. Both models are loaded before the clock starts; chunks/s = chunks embedded and
indexed per second of wall time. kinject's ingest is timed once per embedder backend (torch, onnx,
onnx-int8); the ratio is the default backend's. Recall: squad_short's dev questions searched
in a KB of squad_short built by each backend (recall@1/@4 and MRR of the gold document); the
default backend's recall@4 must stay within 0.5 point of torch's.
Retrieval: 100k embedding-like normalized 384-d vectors (bench/retrieval.py's generator: topic
centres plus noise; random vectors are the worst case for an approximate index and unlike
embeddings); kinject's search path (the index type ingest picks for that size, persisted and
loaded by `Retriever`, `search_vectors`) vs llama-index's `SimpleVectorStore.query`; queries/s and
p50 latency for one query at a time, and kinject's recall@k against an exact scan.

Run: `python -m bench.ingest [--quick]`.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
DIM = 384


def corpus_records(quick: bool) -> tuple[list[dict], str]:
    """squad_short (quick) or all three shared corpora; the demo corpus when shared/ is absent."""
    names = ["squad_short"] if quick else ["squad_short", "multihop_rag", "quality_mc"]
    if all((SHARED / n / "corpus.jsonl").exists() for n in names):
        recs = [json.loads(line) for n in names for line in (SHARED / n / "corpus.jsonl").read_text().splitlines() if line.strip()]
        return recs, "+".join(names)
    from kinject.core.settings import IngestSettings
    from kinject.ingest.readers import read_corpus

    docs, _ = read_corpus(REPO / "demo" / "corpus", IngestSettings())
    return [{"doc_id": d.doc_id, "title": d.title, "text": d.text} for d in docs], "demo/corpus"


def bench_embedding(quick: bool, workdir: Path) -> dict:
    from llama_index.core import Document as LIDocument
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import MetadataMode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from kinject.core.kb import KB
    from kinject.core.models import resolve_model
    from kinject.core.retrieval import get_embedder
    from kinject.core.settings import load_settings
    from kinject.ingest.chunking import Chunker
    from kinject.core.index import load_state
    from kinject.ingest.pipeline import ingest

    from kinject.core.models import embedder_backend

    records, name = corpus_records(quick)
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = load_settings({"kb_root": str(workdir / "kbs")})
    default = embedder_backend(settings)
    # Every backend: load (and on first use export to ONNX) before timing, as for the baseline;
    # then the same ingest into a KB of its own. The ratio is the default backend's.
    backends: dict[str, dict] = {}
    import faiss  # noqa: F401  imported before any clock starts, as the baseline's llama-index is

    for backend in [default, *(b for b in BACKENDS if b != default)]:
        t0 = time.perf_counter()
        get_embedder(settings.models.embedder, settings, backend)
        backends[backend] = {"load_seconds": round(time.perf_counter() - t0, 2)}
    for backend, row in backends.items():
        bsettings = load_settings({"kb_root": str(workdir / "kbs"), "models": {"embedder_backend": backend}})
        t0 = time.perf_counter()
        report = ingest(KB.create(bsettings, f"bench-{backend}"), corpus, bsettings, progress=False)
        seconds = time.perf_counter() - t0
        row.update(chunks=report.chunks_embedded, seconds=round(seconds, 2), chunks_per_s=round(report.chunks_embedded / seconds, 1))
        row.update(squad_dev_recall(bsettings, workdir / f"recall-{backend}"))
    kinject_s, kinject_cps = backends[default]["seconds"], backends[default]["chunks_per_s"]
    report_chunks = backends[default]["chunks"]

    embed_model = HuggingFaceEmbedding(model_name=str(resolve_model(settings.models.embedder, settings)))
    li_docs = [LIDocument(text=r["text"], doc_id=r["doc_id"], metadata={k: v for k, v in r.items() if k not in ("text", "doc_id")}) for r in records]
    t0 = time.perf_counter()
    index = VectorStoreIndex.from_documents(li_docs, embed_model=embed_model)
    llama_s = time.perf_counter() - t0
    llama_chunks = len(index.index_struct.nodes_dict)
    llama_cps = llama_chunks / llama_s

    # Tokens the model actually read: MiniLM stops at max_seq_length, so llama-index's longer
    # nodes are cut silently; kinject's chunks are sized to fit.
    embedder = get_embedder(settings.models.embedder, settings)
    limit = embedder.max_seq_length
    count = lambda text: len(embedder.tokenizer(text, truncation=False, verbose=False)["input_ids"])
    kb_state = load_state(KB.open(settings, f"bench-{default}").root / "index")
    chunker = Chunker(embedder.tokenizer, limit, settings.ingest.chunk_size, settings.ingest.chunk_overlap, settings.ingest.metadata_in_text)
    kinject_tokens = [count(c.embed_text) for d in kb_state.documents.values() for c in chunker.chunk(d)]
    llama_tokens = [count(n.get_content(metadata_mode=MetadataMode.EMBED)) for n in index.docstore.docs.values()]
    torch_recall, default_recall = backends["torch"].get("recall_at_4"), backends[default].get("recall_at_4")
    return {
        "corpus": name,
        "documents": len(records),
        "backend": default,
        "kinject_chunks": report_chunks,
        "kinject_seconds": round(kinject_s, 2),
        "kinject_chunks_per_s": round(kinject_cps, 1),
        "llamaindex_chunks": llama_chunks,
        "llamaindex_seconds": round(llama_s, 2),
        "llamaindex_chunks_per_s": round(llama_cps, 1),
        "ratio": round(kinject_cps / llama_cps, 2),
        "target": ">=2",
        # squad_short dev, R@4 of the default backend against torch's (today's), in points
        "recall_drop_points": None if torch_recall is None else round(100 * (torch_recall - default_recall), 2),
        "recall_drop_points_target": "<=0.5",
        "backends": backends,
        "kinject_tokens_read_per_s": round(sum(min(t, limit) for t in kinject_tokens) / kinject_s, 1),
        "llamaindex_tokens_read_per_s": round(sum(min(t, limit) for t in llama_tokens) / llama_s, 1),
        "kinject_chunks_truncated": sum(t > limit for t in kinject_tokens),
        "llamaindex_chunks_truncated": sum(t > limit for t in llama_tokens),
        "llamaindex_tokens_lost_to_truncation": sum(max(t - limit, 0) for t in llama_tokens),
    }


BACKENDS = ("torch", "onnx", "onnx-int8")


def squad_dev_recall(settings, workdir: Path) -> dict:
    """Recall@1, recall@4 and MRR of the gold document over squad_short's dev questions, with the
    whole squad_short corpus indexed by `settings` (its embedder backend). Empty without shared/."""
    from kinject.core.kb import KB
    from kinject.core.retrieval import Retriever
    from kinject.eval.metrics import ranked_doc_ids, recall_at_k, reciprocal_rank
    from kinject.eval.questions import load_questions
    from kinject.ingest.pipeline import ingest

    folder = SHARED / "squad_short"
    if not (folder / "corpus.jsonl").exists():
        return {}
    settings = settings.model_copy(update={"kb_root": workdir})
    kb = KB.create(settings, "squad")
    ingest(kb, folder / "corpus.jsonl", settings, progress=False)
    questions = load_questions(folder / "questions.jsonl", split="dev")
    hits = Retriever(kb, settings).search_many([q.question for q in questions], 10)
    ranked = [ranked_doc_ids([{"doc_id": h.doc_id} for h in row]) for row in hits]
    n = len(questions)
    return {
        "recall_questions": n,
        "recall_at_1": round(sum(recall_at_k(r, q.doc_ids, 1) for r, q in zip(ranked, questions)) / n, 4),
        "recall_at_4": round(sum(recall_at_k(r, q.doc_ids, 4) for r, q in zip(ranked, questions)) / n, 4),
        "mrr": round(sum(reciprocal_rank(r, q.doc_ids) for r, q in zip(ranked, questions)) / n, 4),
    }


def bench_retrieval(quick: bool, workdir: Path, n: int = 100_000, k: int = 5) -> dict:
    from llama_index.core.schema import TextNode
    from llama_index.core.vector_stores import SimpleVectorStore, VectorStoreQuery

    from kinject.core.kb import KB
    from kinject.core.retrieval import Retriever
    from kinject.core.settings import load_settings
    from kinject.core.index import IndexState, VectorIndex, write_state

    embedding_like = _retrieval_bench().embedding_like
    vectors = embedding_like(n, seed=1)
    queries = embedding_like(100 if quick else 500, seed=2, topics=max(n // 200, 50))

    # kinject: a real KB index on disk, loaded and searched by the service's Retriever
    settings = load_settings({"kb_root": str(workdir / "kbs")})
    kb = KB.create(settings, "vectors")
    index = VectorIndex.empty(DIM)
    index.add(np.arange(n), vectors)
    index.fit(settings.index)  # the type ingest would pick for n vectors
    chunks = {i: {"id": i, "chunk_id": f"c{i}#0", "doc_id": f"c{i}", "title": "", "text": "", "page": None, "metadata": {}} for i in range(n)}
    write_state(kb.dir("ingest"), IndexState(meta={"embedder": settings.models.embedder, "dim": DIM}, index=index, chunks=chunks))
    retriever = Retriever(kb, settings)
    retriever.search_vectors(queries[:1], k)  # loads the index from disk
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        hits = retriever.search_vectors(q[None], k)[0]
        lat.append(time.perf_counter() - t0)
    kinject_top1 = [retriever.search_vectors(q[None], 1)[0][0].doc_id for q in queries[:5]]
    exact_top1 = [f"c{int(np.argmax(vectors @ q))}" for q in queries[:5]]
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    found = [{h.doc_id for h in hits} for hits in retriever.search_vectors(queries, k)]
    recall = float(np.mean([len(f & {f"c{i}" for i in row}) / k for f, row in zip(found, exact)]))

    # llama-index's in-memory default store
    store = SimpleVectorStore()
    store.add([TextNode(id_=f"c{i}", text="", embedding=v.tolist()) for i, v in enumerate(vectors)])
    li_queries = queries[: 5 if quick else 20]
    li_lat, li_top1 = [], []
    for q in li_queries:
        t0 = time.perf_counter()
        res = store.query(VectorStoreQuery(query_embedding=q.tolist(), similarity_top_k=k))
        li_lat.append(time.perf_counter() - t0)
        li_top1.append(res.ids[0])
    p50, li_p50 = float(np.median(lat)), float(np.median(li_lat))
    return {
        "vectors": n,
        "dim": DIM,
        "k": k,
        "kinject_queries": len(lat),
        "kinject_qps": round(len(lat) / sum(lat), 1),
        "kinject_p50_ms": round(p50 * 1e3, 3),
        "kinject_p90_ms": round(float(np.percentile(lat, 90)) * 1e3, 3),
        "llamaindex_queries": len(li_lat),
        "llamaindex_qps": round(len(li_lat) / sum(li_lat), 2),
        "llamaindex_p50_ms": round(li_p50 * 1e3, 1),
        "speedup": round(li_p50 / p50, 1),
        "speedup_target": ">=20",
        "p50_target_ms": "<5",
        "p50_under_5ms": p50 < 0.005,
        "index_kind": index.kind,
        "kinject_recall_at_k": round(recall, 4),
        "recall_at_k_target": ">=0.95",
        "same_top1_as_exact": kinject_top1 == exact_top1 and li_top1[:5] == exact_top1[: len(li_top1[:5])],
        "faiss_threads": _faiss_threads(),
    }


def _retrieval_bench():
    """bench/retrieval.py, by path: `kinject bench` runs this file on its own, not as bench.ingest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kinject_bench_retrieval_data", Path(__file__).with_name("retrieval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _faiss_threads() -> int:
    import faiss

    return faiss.omp_get_max_threads()


def run(quick: bool = False) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="kinject-bench-ingest-") as tmp:
        tmp = Path(tmp)
        (tmp / "e").mkdir()
        (tmp / "r").mkdir()
        result = {"quick": quick, "embedding": bench_embedding(quick, tmp / "e"), "retrieval": bench_retrieval(quick, tmp / "r")}
    try:
        result["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    out = run(quick="--quick" in sys.argv)
    e, r = out["embedding"], out["retrieval"]
    print(
        f"embedding ({e['corpus']}, {e['documents']} docs): kinject {e['kinject_chunks']} chunks in {e['kinject_seconds']} s "
        f"= {e['kinject_chunks_per_s']} chunks/s; llama-index {e['llamaindex_chunks']} chunks in {e['llamaindex_seconds']} s "
        f"= {e['llamaindex_chunks_per_s']} chunks/s; ratio {e['ratio']}x (target >= 2x); tokens read/s "
        f"{e['kinject_tokens_read_per_s']} vs {e['llamaindex_tokens_read_per_s']}; chunks cut at the model's limit: "
        f"kinject {e['kinject_chunks_truncated']}, llama-index {e['llamaindex_chunks_truncated']} "
        f"({e['llamaindex_tokens_lost_to_truncation']} tokens never embedded)"
    )
    for backend, b in e["backends"].items():
        recall = f"; squad_short dev R@1 {b['recall_at_1']:.3f} R@4 {b['recall_at_4']:.3f} MRR {b['mrr']:.3f}" if "recall_at_4" in b else ""
        print(f"  {backend:9s} {b['chunks_per_s']:7.1f} chunks/s (loaded in {b['load_seconds']} s){recall}" + ("  <- default" if backend == e["backend"] else ""))
    print(f"  recall@4 drop of the default backend vs torch: {e['recall_drop_points']} points (target <= 0.5)")
    print(
        f"retrieval ({r['vectors']} x {r['dim']}, k={r['k']}): kinject {r['kinject_qps']} q/s, p50 {r['kinject_p50_ms']} ms; "
        f"llama-index SimpleVectorStore {r['llamaindex_qps']} q/s, p50 {r['llamaindex_p50_ms']} ms; "
        f"speedup {r['speedup']}x (target >= 20x, p50 < 5 ms); {r['index_kind']} index, recall@{r['k']} {r['kinject_recall_at_k']} (target >= 0.95)"
    )
    print(json.dumps(out, indent=2))
