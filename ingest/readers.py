"""Corpus files -> Documents: .txt .md .html .pdf and .jsonl records, with a reason for every skip.

A corpus is a folder (walked recursively; symlinks followed once if they stay inside it), a single
file, or a JSONL of `{"doc_id", "title", "text", ...}` records. A file's doc_id is its path
relative to the corpus root; a JSONL record keeps its own doc_id. Bad input never stops a run:
each file or line that cannot be read becomes a `Skipped(path, reason)`, and each part of a
document left out (hidden HTML, oversized metadata) a `Trimmed(path, what)`. The limits are
`ingest.*` settings.
"""
from __future__ import annotations

import codecs
import errno
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from kinject.core.errors import KinjectError
from kinject.core.index import Document
from kinject.core.settings import IngestSettings
from kinject.ingest.html import TooDeep, visible_text

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".jsonl"}
# JSONL fields that are part of the Document itself; any other field (source, dates...) is metadata.
RECORD_FIELDS = ("doc_id", "id", "title", "text")


class CorpusError(KinjectError):
    """The corpus as a whole cannot be ingested (missing path, nothing readable)."""


@dataclass
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Trimmed:
    path: str
    what: str  # what was left out of the document, and why

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass
class Findings:
    """What reading a corpus left out: whole files or lines, and parts of documents."""

    skipped: list[Skipped] = field(default_factory=list)
    trimmed: list[Trimmed] = field(default_factory=list)


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
    """Files below root in sorted order. Symlinked folders are followed once; loops are skipped,
    and so is a symlink whose target lies outside the corpus (a link to ~/.ssh/id_rsa named
    notes.txt would otherwise be ingested)."""
    seen_dirs: set[str] = set()
    real_root = os.path.realpath(root)

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
            if entry.is_symlink() and os.path.exists(path) and not _within(os.path.realpath(path), real_root):
                skipped.append(Skipped(_rel(path, root), "symlink leading outside the corpus (not followed)"))
                continue
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


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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


def read_corpus(corpus: Path, limits: IngestSettings) -> tuple[list[Document], Findings]:
    """All documents of a corpus (folder, file or JSONL) and what was left out of them, and why."""
    corpus = check_corpus(corpus)
    found = Findings()
    if corpus.is_dir():
        files = list(iter_files(corpus, found.skipped))
        root = corpus
    elif corpus.is_file():
        files, root = [corpus], corpus.parent
    else:
        raise CorpusError(f"corpus path is neither a file nor a folder (broken or looping symlink?): {corpus}")
    return read_files(files, root, limits, found)


def read_files(files: list[Path], root: Path, limits: IngestSettings, found: Findings | None = None) -> tuple[list[Document], Findings]:
    """Read files whose doc_ids are their paths relative to root; duplicates keep the first."""
    found = Findings() if found is None else found
    docs: list[Document] = []
    first_seen: dict[str, str] = {}
    for path in files:
        rel = _rel(path, root)
        try:
            read = read_file(path, rel, limits, found)
        except Exception as e:  # a reader bug or an exotic file must not stop the run
            found.skipped.append(Skipped(rel, f"unreadable ({type(e).__name__}: {e})"))
            continue
        for doc in read:
            if doc.doc_id in first_seen:
                found.skipped.append(Skipped(doc.source, f"duplicate doc_id {doc.doc_id!r} (first in {first_seen[doc.doc_id]})"))
                continue
            first_seen[doc.doc_id] = doc.source
            docs.append(doc)
    return docs, found


def read_file(path: Path, rel: str, limits: IngestSettings, found: Findings) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        found.skipped.append(Skipped(rel, f"unsupported file type {suffix or '(no extension)'}"))
        return []
    size = path.stat().st_size
    if size == 0:
        found.skipped.append(Skipped(rel, "empty file"))
        return []
    if suffix == ".jsonl":  # a corpus file: limits apply to each record
        with open(path, "rb") as f:
            return read_jsonl_records(f, rel, found, limits)
    if size > limits.max_file_mb * 2**20:
        found.skipped.append(Skipped(rel, f"too large ({size / 2**20:.1f} MB > ingest.max_file_mb={limits.max_file_mb:g})"))
        return []
    data = path.read_bytes()
    if suffix == ".pdf":
        doc, reason = read_pdf(data, rel)
    else:
        text, reason = decode_text(data)
        doc = None
        if text is not None:
            if suffix in HTML_SUFFIXES:
                doc, reason = read_html(text, rel, limits.max_html_depth, found)
            else:
                doc, reason = read_plain(text, rel, markdown=suffix != ".txt")
    if doc is None:
        found.skipped.append(Skipped(rel, reason))
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


def read_html(html: str, rel: str, max_depth: int, found: Findings) -> tuple[Document | None, str]:
    """The text a browser shows (ingest.html); what it hides is counted in a Trimmed note."""
    try:
        page = visible_text(html, max_depth)
    except TooDeep as e:
        return None, f"{e} (refused: a tag bomb, or not a page)"
    text = normalize_text(page.text)
    if page.hidden:
        kinds = ", ".join(f"{why} ×{n}" if n > 1 else why for why, n in sorted(page.hidden.items()))
        found.trimmed.append(
            Trimmed(rel, f"dropped what a browser does not show: {sum(page.hidden.values())} element(s), {page.hidden_chars} characters ({kinds})")
        )
    if not text:
        return None, "no text in HTML (only markup, scripts, styles or hidden elements)"
    title = normalize_text(page.title)
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


def read_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line or None when longer than max_bytes, its length). A long line is read
    through in blocks and never held whole."""
    lineno = 0
    while raw := f.readline(max_bytes + 1):
        lineno += 1
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield lineno, raw, len(raw)
            continue
        length = len(raw)
        while block := f.readline(1 << 20):
            length += len(block)
            if block.endswith(b"\n"):
                break
        yield lineno, None, length


def cap_metadata(metadata: dict, max_bytes: int) -> tuple[dict, list[str]]:
    """Metadata within max_bytes of JSON (every chunk of the record carries it): the largest
    fields are dropped until it fits. Returns (kept, dropped field names)."""
    # json.dumps({a: 1, b: 2}) is '{' + '"a": 1' + ', ' + '"b": 2' + '}': sizes add up exactly.
    sizes = {k: len(json.dumps({k: v}, ensure_ascii=False).encode()) - 2 for k, v in metadata.items()}
    total = 2 + sum(sizes.values()) + 2 * max(len(sizes) - 1, 0)
    dropped = []
    for key in sorted(sizes, key=sizes.get, reverse=True):
        if total <= max_bytes:
            break
        dropped.append(key)
        total -= sizes[key] + (2 if len(sizes) - len(dropped) > 0 else 0)
    gone = set(dropped)
    return {k: v for k, v in metadata.items() if k not in gone}, dropped


def _some(items: list, n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def read_jsonl_records(f: BinaryIO, rel: str, found: Findings, limits: IngestSettings) -> list[Document]:
    """One Document per valid line; every bad line is skipped with its line number."""
    docs: list[Document] = []
    capped_lines: list[int] = []  # records whose metadata was cut to max_metadata_bytes
    capped_fields: dict[str, None] = {}  # the fields dropped, in order of first drop
    skipped_before = len(found.skipped)
    for lineno, raw, length in read_lines(f, limits.max_jsonl_line_bytes):
        where = f"{rel}:{lineno}"
        if raw is None:
            found.skipped.append(Skipped(where, f"line too long ({length:,} bytes > ingest.max_jsonl_line_bytes={limits.max_jsonl_line_bytes})"))
            continue
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            found.skipped.append(Skipped(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})"))
            continue
        except json.JSONDecodeError as e:
            found.skipped.append(Skipped(where, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(rec, dict):
            found.skipped.append(Skipped(where, f"not a JSON object (got {type(rec).__name__})"))
            continue
        doc_id = rec.get("doc_id", rec.get("id"))
        if not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
            found.skipped.append(Skipped(where, "missing doc_id"))
            continue
        text = rec.get("text")
        if not isinstance(text, str) or not normalize_text(text):
            found.skipped.append(Skipped(where, f"record {doc_id!r} has no text"))
            continue
        metadata, dropped = cap_metadata({k: v for k, v in rec.items() if k not in RECORD_FIELDS}, limits.max_metadata_bytes)
        if dropped:
            capped_lines.append(lineno)
            capped_fields.update(dict.fromkeys(dropped))
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
    if capped_lines:
        found.trimmed.append(
            Trimmed(
                rel,
                f"metadata over ingest.max_metadata_bytes={limits.max_metadata_bytes} in {len(capped_lines)} record(s) "
                f"(lines {_some(capped_lines)}): dropped field(s) {_some([repr(k) for k in capped_fields])}",
            )
        )
    if not docs and len(found.skipped) == skipped_before:
        found.skipped.append(Skipped(rel, "no records (only blank lines)"))
    return docs
