"""`kinject ingest CORPUS --kb NAME` and `kinject search NAME "query"`."""
from __future__ import annotations

from typing import Optional

import typer


def ingest_cmd(
    ctx: typer.Context,
    corpus: str = typer.Argument(..., help="A folder, a file, or a JSONL of {doc_id, title, text, ...} records."),
    kb: str = typer.Option(..., "--kb", help="KB name; created if missing."),
    chunk_size: Optional[int] = typer.Option(None, help="Chunk size in embedder tokens (ingest.chunk_size)."),
    chunk_overlap: Optional[int] = typer.Option(None, help="Overlap in embedder tokens (ingest.chunk_overlap)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the embedding progress bar."),
) -> None:
    """Build or update a KB's retrieval index from a corpus; unchanged documents are not embedded again."""
    from kinject.core.settings import settings_from
    from kinject.core.kb import KB
    from kinject.ingest.pipeline import ingest
    from kinject.ingest.readers import check_corpus

    check_corpus(corpus)  # before the KB is created
    settings = settings_from(ctx, **{"ingest.chunk_size": chunk_size, "ingest.chunk_overlap": chunk_overlap})
    report = ingest(KB.open(settings, kb, create=True), corpus, settings, progress=progress)
    typer.echo(report.summary())


def search_cmd(
    ctx: typer.Context,
    kb: str = typer.Argument(..., help="KB name."),
    query: str = typer.Argument(..., help="What to look for."),
    k: Optional[int] = typer.Option(None, "-k", "--top-k", help="Number of hits (retrieval.top_k)."),
    width: int = typer.Option(160, help="Characters of each hit's text to print."),
) -> None:
    """Print the KB's best-matching chunks for a query: score, doc_id, title, snippet."""
    from kinject.core.settings import settings_from
    from kinject.core.kb import KB
    from kinject.core.retrieval import retrieve

    settings = settings_from(ctx, **{"retrieval.top_k": k})
    hits = retrieve(KB.open(settings, kb), query, settings=settings)
    if not hits:
        typer.echo("no hits")
    for rank, h in enumerate(hits, start=1):
        snippet = " ".join(h.text.split())
        snippet = snippet if len(snippet) <= width else snippet[: width - 3] + "..."
        page = f" p.{h.page}" if h.page else ""
        typer.echo(f"{rank:2d}. {h.score:.3f}  {h.doc_id}{page}  {h.title}\n    {snippet}")
