"""The ingest stage's one door: `ingest(kb, corpus, settings) -> IngestReport`.

corpus -> Documents (readers) -> chunks (chunking) -> vectors (embedder) -> FAISS index (index).
Incremental: only documents whose content hash is new or changed are chunked and embedded; a
changed document's chunks are replaced and a removed document's chunks deleted, so the index
answers as a from-scratch build of the same corpus would. `add_files` adds uploaded files
without removing anything, and keeps their originals in the KB's uploads/ folder, which every
`ingest` reads after the corpus: an upload survives a re-ingest. The stage is recorded in the
manifest once the new index is current.
"""
from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kinject.core.files import append_jsonl, atomic_copy, read_jsonl, sha256_text
from kinject.core.kb import KB, work_seconds
from kinject.core.settings import Settings
from kinject.core.stage import StageResult, StageTimer
from kinject.ingest.chunking import CHUNKER_VERSION, Chunk, Chunker
from kinject.core.index import Document, IndexState, fit_index, load_documents, load_state, new_index, read_meta, write_state
from kinject.ingest.readers import CorpusError, Findings, Skipped, Trimmed, read_corpus, read_files

__all__ = ["IngestReport", "ingest", "add_files", "CorpusError"]


@dataclass(kw_only=True)
class IngestReport(StageResult):
    """Status "skipped" when the index already matched the documents, "resumed" when some vectors
    came from the checkpoint of a run that was interrupted while embedding."""

    stage: ClassVar[str] = "ingest"
    kb: str
    corpus: str
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)  # files and lines left out, with the reason
    trimmed: list[Trimmed] = field(default_factory=list)
    documents: int = 0  # in the index after the run
    chunks: int = 0  # in the index after the run
    chunks_embedded: int = 0
    chunks_from_checkpoint: int = 0  # vectors a crashed earlier run had already computed
    embed_seconds: float = 0.0
    chunks_per_s: float = 0.0  # chunks embedded per second of embedding
    rebuilt: str = ""  # why the whole index was rebuilt, if it was
    reindexed: str = ""  # why the vectors were re-indexed without embedding (index type or store), if they were
    generation: str | None = None
    fingerprint: str = ""

    def summary(self) -> str:
        lines = [
            f"ingested {self.corpus} into KB {self.kb!r}" + (f" (index {self.generation})" if self.generation else ""),
            f"  documents: {len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed, "
            f"{self.unchanged} unchanged, {len(self.skipped)} skipped; {self.documents} in the index",
            f"  chunks: {self.chunks_embedded} embedded ({self.chunks_per_s:.1f} chunks/s), {self.chunks} in the index; "
            f"{self.seconds:.1f} s in all",
        ]
        if self.chunks_from_checkpoint:
            lines.append(f"  resumed: {self.chunks_from_checkpoint} of those vectors came from the interrupted run's checkpoint")
        if self.reindexed:
            lines.append(f"  index: {self.reindexed}")
        if self.rebuilt:
            lines.append(f"  rebuilt from scratch: {self.rebuilt}")
        if self.skipped:
            lines.append("  skipped:")
            lines += [f"    {s}" for s in self.skipped]
        if self.trimmed:
            lines.append("  trimmed:")
            lines += [f"    {t}" for t in self.trimmed]
        return "\n".join(lines)


@dataclass
class Incoming:
    """The documents one ingest brings, and what reading them left out."""

    source: str  # the corpus, or the uploaded files, as the report names them
    docs: list[Document]
    found: Findings
    complete: bool  # the whole corpus: an indexed document it lacks is removed


def ingest(kb: KB, corpus_path: str | Path, settings: Settings, progress: bool = True) -> IngestReport:
    """Make the KB's index match the corpus plus the KB's uploads: add new, replace changed,
    delete removed documents. A corpus document wins over an upload with the same doc_id."""
    timer = StageTimer()
    corpus = Path(corpus_path).expanduser()
    docs, found = read_corpus(corpus, settings.ingest)
    if kb.uploads.is_dir() and any(kb.uploads.iterdir()):
        uploaded, more = read_corpus(kb.uploads, settings.ingest)
        first = {d.doc_id: d.source for d in docs}
        for d in uploaded:
            if d.doc_id in first:
                more.skipped.append(Skipped(f"uploads/{d.source}", f"duplicate doc_id {d.doc_id!r} (first in the corpus: {first[d.doc_id]})"))
            else:
                docs.append(d)
        found.skipped += [Skipped(f"uploads/{s.path}", s.reason) for s in more.skipped]
        found.trimmed += [Trimmed(f"uploads/{t.path}", t.what) for t in more.trimmed]
    if not docs:
        detail = f"{len(found.skipped)} file(s) or line(s) skipped, e.g. {found.skipped[0]}" if found.skipped else "it holds no files"
        raise CorpusError(f"no documents to index in {corpus}: {detail}")
    return _update(kb, Incoming(str(corpus), docs, found, complete=True), settings, progress, timer)


def add_files(kb: KB, paths: list[str | Path], settings: Settings, progress: bool = False) -> IngestReport:
    """Index a few files (an upload) into the KB, keeping every other document, and keep each
    file that gave a document in the KB's uploads/ folder.

    A file's doc_id is its name (a JSONL file's records keep their own). A file whose name, or
    any of whose doc_ids, is already in the KB is refused, never replaced: an upload must not
    silently overwrite a document.
    """
    timer = StageTimer()
    paths = [Path(x).expanduser() for x in paths]
    for p in paths:
        if not p.is_file():
            raise CorpusError(f"not a file: {p}")
    with kb.lock():  # no other upload may take the same names in between
        docs, found = [], Findings()
        known = {d.doc_id for d in load_documents(kb)}
        keep: dict[str, Path] = {}
        for p in paths:
            if p.name.startswith("."):
                found.skipped.append(Skipped(p.name, "hidden file (a name starting with '.'), which ingest does not read"))
                continue
            if (kb.uploads / p.name).exists() or p.name in keep:
                found.skipped.append(Skipped(p.name, "a file with this name was already uploaded to this KB; rename it to add it as a new document"))
                continue
            read, _ = read_files([p], p.parent, settings.ingest, found)
            taken = sorted({d.doc_id for d in read} & (known | {d.doc_id for d in docs}))
            if taken:
                found.skipped.append(Skipped(p.name, f"the KB already has a document {taken[0]!r}; nothing from this file was added (rename the file or change its doc_ids)"))
                continue
            docs += read
            if read:
                keep[p.name] = p
        corpus = ", ".join(map(str, paths))
        if not docs:  # nothing readable: leave the index and the manifest as they are
            meta = read_meta(kb.root / "index") or {}
            return IngestReport(
                status="skipped", kb=kb.name, corpus=corpus, skipped=found.skipped, trimmed=found.trimmed,
                documents=meta.get("documents", 0), chunks=meta.get("chunks", 0), **timer.elapsed(),
            )
        for name, p in keep.items():
            atomic_copy(p, kb.uploads / name)
        try:
            return _update(kb, Incoming(corpus, docs, found, complete=False), settings, progress, timer)
        except BaseException:
            for name in keep:  # not indexed: the same upload may be tried again
                (kb.uploads / name).unlink(missing_ok=True)
            raise


def _build_settings(settings: Settings, meta: dict | None = None) -> dict:
    """What the vectors depend on: if any of this changes, the index is rebuilt. (The model's
    dimension and sequence limit are added once it is loaded; they follow from its name.)
    `auto` over an existing index (`meta`) keeps its numerics: a new default does not re-embed a
    KB and make its later stages stale; a backend set by name does."""
    from kinject.core.models import embedder_backend
    from kinject.core.onnx_embedder import EMBEDDER_NUMERICS
    from kinject.core.retrieval import index_backend

    auto_over_index = meta is not None and settings.models.embedder_backend == "auto"
    backend = index_backend(meta, settings) if auto_over_index else embedder_backend(settings)
    return {
        "embedder": settings.models.embedder,
        "embedder_backend": backend,  # recorded; a change of backend alone does not rebuild
        "embedder_numerics": EMBEDDER_NUMERICS[backend],  # a change of numerics (fp32 <-> int8) does
        "chunk_size": settings.ingest.chunk_size,
        "chunk_overlap": settings.ingest.chunk_overlap,
        "metadata_in_text": settings.ingest.metadata_in_text,
        "chunker_version": CHUNKER_VERSION,
    }


# Build keys that are recorded but whose change alone keeps the vectors (fp32 torch and fp32 ONNX
# embed alike), and the value a key takes in an index written before it was recorded.
_RECORDED_ONLY = {"embedder_backend"}
_BEFORE_RECORDED = {"embedder_numerics": "fp32"}

CHECKPOINT = "embedding-checkpoint.jsonl"


def _embed_with_checkpoint(embedder, chunks: list, folder: Path, settings: Settings, progress: bool) -> tuple[np.ndarray, int]:
    """Embed chunks, appending each batch's vectors to a checkpoint file, so a run that crashed
    mid-way embeds only what it had not reached. Returns (vectors, how many came from the file)."""
    path = folder / CHECKPOINT
    numerics = "" if embedder.numerics == "fp32" else f"{embedder.numerics}\n"
    key = lambda text: sha256_text(f"{settings.models.embedder}\n{numerics}{text}")
    saved = {r["key"]: r["vector"] for r in read_jsonl(path)}
    keys = [key(c.embed_text) for c in chunks]
    known = [i for i, k in enumerate(keys) if k in saved]
    todo = [i for i, k in enumerate(keys) if k not in saved]

    def save(rows, vecs):
        append_jsonl(path, [{"key": keys[todo[r]], "vector": base64.b64encode(v.astype(np.float32).tobytes()).decode()} for r, v in zip(rows, vecs)])

    fresh = embedder.encode([chunks[i].embed_text for i in todo], batch_size=settings.ingest.embed_batch_size, progress=progress, on_batch=save)
    vectors = np.zeros((len(chunks), embedder.dim), dtype=np.float32)
    vectors[todo] = fresh
    for i in known:
        vectors[i] = np.frombuffer(base64.b64decode(saved[keys[i]]), dtype=np.float32)
    return vectors, len(known)


def fingerprint(documents: dict[str, Document] | list[Document], build: dict) -> str:
    docs = documents.values() if isinstance(documents, dict) else documents
    pairs = sorted((d.doc_id, d.content_hash) for d in docs)
    # What the vectors do not depend on, or a key at the value it had before it was recorded, is
    # left out: switching torch <-> onnx keeps an index's fingerprint, and so its later stages.
    build = {k: v for k, v in build.items() if k not in _RECORDED_ONLY and _BEFORE_RECORDED.get(k, object()) != v}
    return sha256_text(json.dumps({"documents": pairs, "build": build}, sort_keys=True))


@dataclass
class Plan:
    """What an ingest will change in the index, worked out before anything is embedded or written."""

    state: IndexState  # the current index (emptied when it is rebuilt), its meta set to `build`
    build: dict  # what the vectors depend on
    old: dict[str, Document]  # the documents the index held
    new: dict[str, Document]  # the documents read now
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    rebuilt: str  # why the whole index is embedded again, if it is
    embedder: Any  # loaded only when there is something to embed
    replaced: Any = None  # the index a rebuild replaces (a Milvus collection is dropped once the new one is current)

    @property
    def to_embed(self) -> list[Document]:
        return [self.new[i] for i in self.added + self.changed]


@dataclass
class Embedded:
    chunks: list[Chunk]
    vectors: np.ndarray | None
    from_checkpoint: int = 0  # vectors a crashed earlier run had already computed
    seconds: float = 0.0


def _update(kb: KB, incoming: Incoming, settings: Settings, progress: bool, timer: StageTimer) -> IngestReport:
    with kb.lock():
        folder = kb.dir("ingest")
        previous = kb.stage("ingest")
        plan = _plan(load_state(folder), incoming, settings, folder, kb.name)
        embedded = _embed(plan, folder, settings, progress)
        did_work, reindexed = _commit(plan, embedded, folder, incoming.complete, settings, kb.name)
        state = plan.state
        found = incoming.found
        chunks_embedded = len(embedded.chunks) - embedded.from_checkpoint
        report = IngestReport(
            status="skipped" if not did_work else "resumed" if embedded.from_checkpoint else "ran",
            kb=kb.name,
            corpus=incoming.source,
            added=plan.added,
            changed=plan.changed,
            removed=plan.removed,
            unchanged=plan.unchanged,
            skipped=found.skipped,
            trimmed=found.trimmed,
            documents=len(state.documents),
            chunks=len(state.chunks),
            chunks_embedded=chunks_embedded,
            chunks_from_checkpoint=embedded.from_checkpoint,
            embed_seconds=embedded.seconds,
            chunks_per_s=round(chunks_embedded / embedded.seconds, 1) if embedded.seconds > 0 else 0.0,
            rebuilt=plan.rebuilt,
            reindexed=reindexed,
            generation=state.generation,
            fingerprint=state.meta["fingerprint"],
            **timer.elapsed(),
        )
        _record(kb, report, plan.build, timer, previous)
    return report


def _plan(state: IndexState | None, incoming: Incoming, settings: Settings, folder: Path, label: str) -> Plan:
    """Compare the documents read with the index: which to add, replace and remove, and whether
    a changed setting means embedding everything again."""
    from kinject.core.retrieval import get_embedder

    docs = incoming.docs
    build = _build_settings(settings, state.meta if state is not None else None)
    rebuilt, replaced = "", None
    if state is not None:
        differs = [k for k in build if k not in _RECORDED_ONLY and state.meta.get(k, _BEFORE_RECORDED.get(k)) != build[k]]
        if differs:
            rebuilt = "changed " + ", ".join(f"{k} ({state.meta.get(k, _BEFORE_RECORDED.get(k))} -> {build[k]})" for k in differs)
            if not incoming.complete:  # an upload keeps the other documents: they are embedded again too
                docs = [d for d in state.documents.values() if d.doc_id not in {x.doc_id for x in docs}] + docs
            replaced = state.index
            state = IndexState(meta={"next_id": state.meta.get("next_id", 0)}, index=None, chunks={}, generation=state.generation)
    if state is None:
        state = IndexState(meta={"next_id": 0}, index=None, chunks={})
    old = state.documents
    embedder = None
    if state.index is None or any(d.doc_id not in old or old[d.doc_id].content_hash != d.content_hash for d in docs):
        embedder = get_embedder(settings.models.embedder, settings, build["embedder_backend"])  # loaded only when there is work for it
        # what actually embeds (auto falls back to torch for a pipeline ONNX does not run)
        build.update(embedder_backend=embedder.backend, embedder_numerics=embedder.numerics, dim=embedder.dim, max_seq_length=embedder.max_seq_length)
        if state.index is None:
            state.index = new_index(settings.index, folder, embedder.dim, label)
    else:
        build.update(dim=state.meta["dim"], max_seq_length=state.meta["max_seq_length"])
    state.meta.update(build)
    new = {d.doc_id: d for d in docs}
    added = [d.doc_id for d in docs if d.doc_id not in old]
    changed = [d.doc_id for d in docs if d.doc_id in old and old[d.doc_id].content_hash != d.content_hash]
    return Plan(
        state=state,
        build=build,
        old=old,
        new=new,
        added=added,
        changed=changed,
        removed=[i for i in old if i not in new] if incoming.complete else [],
        unchanged=len(docs) - len(added) - len(changed),
        rebuilt=rebuilt,
        embedder=embedder,
        replaced=replaced,
    )


def _embed(plan: Plan, folder: Path, settings: Settings, progress: bool) -> Embedded:
    """Chunk and embed the new and changed documents."""
    todo = plan.to_embed
    if not todo:
        return Embedded(chunks=[], vectors=None)
    cfg, embedder = settings.ingest, plan.embedder
    chunker = Chunker(embedder.tokenizer, embedder.max_seq_length, cfg.chunk_size, cfg.chunk_overlap, cfg.metadata_in_text)
    chunks = [c for d in todo for c in chunker.chunk(d)]
    t0 = time.perf_counter()
    vectors, from_checkpoint = _embed_with_checkpoint(embedder, chunks, folder, settings, progress)
    return Embedded(chunks, vectors, from_checkpoint, round(time.perf_counter() - t0, 3))


def _commit(plan: Plan, embedded: Embedded, folder: Path, complete: bool, settings: Settings, label: str) -> tuple[bool, str]:
    """Apply the plan to the index and write it as a new generation when anything changed.
    Returns whether anything did, and why the index was rebuilt or moved without embedding."""
    state = plan.state
    # Drop the chunks of changed and removed documents: exactly their ids.
    gone = set(plan.changed) | set(plan.removed)
    drop = [cid for cid, rec in state.chunks.items() if rec["doc_id"] in gone]
    state.index.remove(drop)
    for cid in drop:
        del state.chunks[cid]

    chunks = embedded.chunks
    next_id = int(state.meta.get("next_id", 0))
    ids = np.arange(next_id, next_id + len(chunks), dtype=np.int64)
    if chunks:
        state.index.add(ids, embedded.vectors)
    for cid, c in zip(ids.tolist(), chunks):
        state.chunks[cid] = {"id": cid, "chunk_id": c.chunk_id, "doc_id": c.doc_id, "title": c.title, "text": c.text, "page": c.page, "metadata": c.metadata}

    # the store settings.index names, the index type for the new size, deleted vectors dropped
    state.index, refit, moved_from = fit_index(state.index, settings.index, folder, label)
    state.documents = dict(plan.new) if complete else {**plan.old, **plan.new}
    fp = fingerprint(state.documents, plan.build)
    state.meta.update(
        next_id=next_id + len(chunks), documents=len(state.documents), chunks=len(state.chunks), fingerprint=fp, index_kind=state.index.kind
    )
    did_work = bool(chunks or drop or plan.removed or state.generation is None or plan.rebuilt or refit or plan.old != state.documents)
    if did_work:
        write_state(folder, state)
        for old in (plan.replaced, moved_from):
            if old is not None and old is not state.index and hasattr(old, "drop"):
                old.drop()  # a Milvus collection no generation from now on uses
    (folder / CHECKPOINT).unlink(missing_ok=True)  # its vectors are in the index now
    return did_work, refit


def _record(kb: KB, report: IngestReport, build: dict, timer: StageTimer, previous: dict | None) -> None:
    kb.record_stage(
        "ingest",
        fingerprint=report.fingerprint,
        outputs={"index": f"index/{report.generation}", "documents": report.documents, "chunks": report.chunks},
        metrics={
            "added": len(report.added),
            "changed": len(report.changed),
            "removed": len(report.removed),
            "unchanged": report.unchanged,
            "skipped": len(report.skipped),
            "chunks_embedded": report.chunks_embedded,
            "seconds": report.seconds,
            "chunks_per_s": report.chunks_per_s,
        },
        started_at=timer.started_at,
        # a run that changed nothing keeps the time of the run that built the index
        work_seconds=work_seconds(previous) if report.status == "skipped" else None,
        corpus=report.corpus,
        build=build,
        skipped=[{"path": s.path, "reason": s.reason} for s in report.skipped],
        trimmed=[{"path": t.path, "what": t.what} for t in report.trimmed],
    )
