"""Corpus files -> Documents: .txt .md .html .pdf and .jsonl records, with a reason for every skip.

A corpus is a folder (walked recursively, symlinks followed once), a single file, or a JSONL of
`{"doc_id", "title", "text", ...}` records. A file's doc_id is its path relative to the corpus
root; a JSONL record keeps its own doc_id. Bad input never stops a run: each file or line that
cannot be read becomes a `Skipped(path, reason)`.
"""
from __future__ import annotations

import codecs
import errno
import json
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from core.errors import KinjectError
from core.files import sha256_text

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".jsonl"}
# JSONL fields that are part of the Document itself; any other field (source, dates...) is metadata.
RECORD_FIELDS = ("doc_id", "id", "title", "text")


class CorpusError(KinjectError):
    """The corpus as a whole cannot be ingested (missing path, nothing readable)."""


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


@dataclass
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def content_hash(title: str, text: str, metadata: dict) -> str:
    return sha256_text(json.dumps([title, text, metadata], sort_keys=True, ensure_ascii=False))


_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, unix newlines, runs of spaces collapsed, at most one blank line between paragraphs."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x00", "")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


# ---- walking the corpus -------------------------------------------------------------------
def iter_files(root: Path, skipped: list[Skipped]) -> Iterator[Path]:
    """Files below root in sorted order. Symlinked folders are followed once; loops are skipped."""
    seen_dirs: set[str] = set()

    def walk(folder: Path) -> Iterator[Path]:
        real = os.path.realpath(folder)
        if real in seen_dirs:
            skipped.append(Skipped(_rel(folder, root), "symlink loop (folder already visited)"))
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped.append(Skipped(_rel(folder, root), f"cannot list folder ({e.strerror})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and folders (.git, .DS_Store) are not content
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = entry.is_file()
            except OSError as e:
                reason = "symlink loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
                skipped.append(Skipped(_rel(path, root), reason))
                continue
            if is_dir:
                yield from walk(path)
            elif is_file:
                yield path
            elif entry.is_symlink() and not os.path.exists(path):
                reason = "symlink loop" if _is_link_loop(path) else "broken symlink"
                skipped.append(Skipped(_rel(path, root), reason))
            else:  # never opened: reading a FIFO would block the run
                skipped.append(Skipped(_rel(path, root), "not a regular file (FIFO, socket or device)"))

    yield from walk(root)


def _is_link_loop(path: Path) -> bool:
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 signals a loop this way
        return True
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def check_corpus(corpus: str | Path) -> Path:
    corpus = Path(corpus).expanduser()
    if not corpus.exists() and not corpus.is_symlink():
        raise CorpusError(f"corpus path not found: {corpus}")
    return corpus


def read_corpus(corpus: Path, max_file_mb: float) -> tuple[list[Document], list[Skipped]]:
    """All documents of a corpus (folder, file or JSONL) and the reasons anything was skipped."""
    corpus = check_corpus(corpus)
    skipped: list[Skipped] = []
    if corpus.is_dir():
        files = list(iter_files(corpus, skipped))
        root = corpus
    elif corpus.is_file():
        files, root = [corpus], corpus.parent
    else:
        raise CorpusError(f"corpus path is neither a file nor a folder (broken or looping symlink?): {corpus}")
    return read_files(files, root, max_file_mb, skipped)


def read_files(
    files: list[Path], root: Path, max_file_mb: float, skipped: list[Skipped] | None = None
) -> tuple[list[Document], list[Skipped]]:
    """Read files whose doc_ids are their paths relative to root; duplicates keep the first."""
    skipped = [] if skipped is None else skipped
    docs: list[Document] = []
    first_seen: dict[str, str] = {}
    for path in files:
        rel = _rel(path, root)
        try:
            found = read_file(path, rel, max_file_mb, skipped)
        except Exception as e:  # a reader bug or an exotic file must not stop the run
            skipped.append(Skipped(rel, f"unreadable ({type(e).__name__}: {e})"))
            continue
        for doc in found:
            if doc.doc_id in first_seen:
                skipped.append(Skipped(doc.source, f"duplicate doc_id {doc.doc_id!r} (first in {first_seen[doc.doc_id]})"))
                continue
            first_seen[doc.doc_id] = doc.source
            docs.append(doc)
    return docs, skipped


def read_file(path: Path, rel: str, max_file_mb: float, skipped: list[Skipped]) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        skipped.append(Skipped(rel, f"unsupported file type {suffix or '(no extension)'}"))
        return []
    size = path.stat().st_size
    if size == 0:
        skipped.append(Skipped(rel, "empty file"))
        return []
    limit = max_file_mb * 1024 * 1024
    if suffix == ".jsonl":  # a corpus file: the limit applies to each record
        with open(path, "rb") as f:
            return read_jsonl_records(f, rel, skipped, limit)
    if size > limit:
        skipped.append(Skipped(rel, f"too large ({size / 2**20:.1f} MB > ingest.max_file_mb={max_file_mb:g})"))
        return []
    data = path.read_bytes()
    if suffix == ".pdf":
        doc, reason = read_pdf(data, rel)
    else:
        text, reason = decode_text(data)
        doc = None
        if text is not None:
            if suffix in HTML_SUFFIXES:
                doc, reason = read_html(text, rel)
            else:
                doc, reason = read_plain(text, rel, markdown=suffix != ".txt")
    if doc is None:
        skipped.append(Skipped(rel, reason))
        return []
    return [doc]


# UTF-32 first: its little-endian BOM starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes) -> tuple[str | None, str]:
    """UTF-8 (with or without BOM), or UTF-16/32 when a BOM says so (their text has NUL bytes)."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec), ""
            except UnicodeDecodeError as e:
                return None, f"not valid {codec.upper()} despite its byte-order mark ({e.reason} at offset {e.start})"
    if b"\x00" in data[:8192]:
        return None, "binary file (NUL bytes)"
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"


# ---- readers ------------------------------------------------------------------------------
def read_plain(text: str, rel: str, markdown: bool) -> tuple[Document | None, str]:
    text = normalize_text(text)
    if not text:
        return None, "no text (only whitespace)"
    title = ""
    first = text.split("\n", 1)[0]
    if markdown:
        m = re.search(r"^#{1,3}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)
        title = m.group(1) if m else ""
    elif len(first) <= 100:
        title = first
    return Document(doc_id=rel, title=title or Path(rel).stem, text=text, source=rel), ""


def read_html(html: str, rel: str) -> tuple[Document | None, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    title_tag = soup.find("title")
    title = normalize_text(title_tag.get_text(" ")) if title_tag else ""
    if title_tag:
        title_tag.decompose()
    body = soup.body or soup
    if not title:
        heading = body.find(["h1", "h2", "h3"])
        title = normalize_text(heading.get_text(" ")) if heading else ""
    text = normalize_text(body.get_text("\n"))
    if not text:
        return None, "no text in HTML (only markup, scripts or styles)"
    return Document(doc_id=rel, title=title or Path(rel).stem, text=text, source=rel), ""


def read_pdf(data: bytes, rel: str) -> tuple[Document | None, str]:
    """Text of every page; chunks later find their page through metadata["_page_starts"]."""
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            return None, "encrypted PDF"
        pages = [normalize_text(page.extract_text() or "") for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable PDF ({type(e).__name__}: {e})"
    if not any(pages):
        return None, f"PDF has no text layer ({len(pages)} page(s); scanned images need OCR first)"
    text, starts = "", []
    for page in pages:
        if text and page:
            text += "\n\n"
        starts.append(len(text))
        text += page
    title = ""
    meta_title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    if isinstance(meta_title, str):
        title = normalize_text(meta_title)
    return Document(doc_id=rel, title=title or Path(rel).stem, text=text, source=rel, metadata={"_page_starts": starts}), ""


def read_jsonl_records(lines: Iterable[bytes], rel: str, skipped: list[Skipped], max_record_bytes: float) -> list[Document]:
    """One Document per valid line; every bad line is skipped with its line number."""
    docs: list[Document] = []
    for lineno, raw in enumerate(lines, start=1):
        where = f"{rel}:{lineno}"
        if not raw.strip():
            continue
        if len(raw) > max_record_bytes:
            skipped.append(Skipped(where, f"record too large ({len(raw) / 2**20:.1f} MB > ingest.max_file_mb)"))
            continue
        try:
            rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            skipped.append(Skipped(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})"))
            continue
        except json.JSONDecodeError as e:
            skipped.append(Skipped(where, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(rec, dict):
            skipped.append(Skipped(where, f"not a JSON object (got {type(rec).__name__})"))
            continue
        doc_id = rec.get("doc_id", rec.get("id"))
        if not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
            skipped.append(Skipped(where, "missing doc_id"))
            continue
        text = rec.get("text")
        if not isinstance(text, str) or not normalize_text(text):
            skipped.append(Skipped(where, f"record {doc_id!r} has no text"))
            continue
        metadata = {k: v for k, v in rec.items() if k not in RECORD_FIELDS}
        title = rec.get("title")
        docs.append(
            Document(
                doc_id=str(doc_id).strip(),
                title=normalize_text(title) if isinstance(title, str) and title.strip() else str(doc_id),
                text=normalize_text(text),
                source=where,
                metadata=metadata,
            )
        )
    if not docs and not any(s.path.startswith(f"{rel}:") for s in skipped):
        skipped.append(Skipped(rel, "no records (only blank lines)"))
    return docs
