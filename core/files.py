"""Atomic file writes and content hashes: every stage writes through these."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from kinject.core.errors import KinjectError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """Hash of every file's relative path and content below root, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(root).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temp file in the target's folder, fsync'd and renamed over the target on success.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_file(path) as f:
        f.write(data)


def atomic_copy(src: Path, path: Path) -> None:
    """Copy a file of any size into place as atomic_write_bytes would write it."""
    with open(src, "rb") as source, _atomic_file(path) as f:
        shutil.copyfileobj(source, f, 1 << 20)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the kernel, the
    C library or the filesystem cannot; the caller then falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` in place of folder `target`, which readers see whole at every instant:
    the two are exchanged in one step, then the old one (now at `new`) is deleted. Without
    RENAME_EXCHANGE, target is moved aside and new renamed in: a reader in between finds nothing."""
    if not _exchange(new, target):
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        new = old
    shutil.rmtree(new, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it takes the place of `target` at once.

    If another process already produced `target` meanwhile, ours is discarded (first one wins),
    so two racing writers of the same content are safe.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.exists():
            _replace_dir(tmp, target)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append whole lines and fsync: a crash may lose the last, partial line, never earlier ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON value in `path`, or `default` when there is no such file. A file that is there
    but not valid JSON is an error naming it: read as empty, the next write would replace it."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KinjectError(f"{path} is not valid JSON ({e}): fix or remove it") from e


def jsonl_values(lines: Iterable[str], where: Path | str, error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a user's JSONL file; a line that is not JSON
    raises `error` naming the file (`where`) and the line."""
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where} line {line_no}: not valid JSON ({e.msg})") from None


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file written by append_jsonl, ignoring a torn last line left by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out
