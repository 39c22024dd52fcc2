"""Run the `kinject` CLI and SIGKILL it at an exact point of its file writes (fault injection).

    KINJECT_CRASH_AT=EVENT:NAME:N python tests/crashpoint.py ingest CORPUS --kb x

EVENT is one of
  replace   killed just before the N-th rename onto a file or folder called NAME: the temp file of
            an atomic write is complete (fsync'd) but not in place yet;
  torn      killed in the middle of the N-th append_jsonl to NAME, halfway through its last line;
  appended  the N-th append_jsonl to NAME has returned; the process then stops itself (SIGSTOP),
            holding whatever it holds, for the test to look at and SIGKILL.

Without KINJECT_CRASH_AT it is exactly `kinject`. Real code runs throughout; only the process's
own death is added. PYTHONPATH must hold the repository root.
"""
from __future__ import annotations

import json
import os
import signal
import sys

_EVENT, _NAME, _NTH = (os.environ.get("KINJECT_CRASH_AT", "::0").split(":") + ["", "", "0"])[:3]
_seen = 0


def _hit(event: str, path) -> bool:
    global _seen
    if event != _EVENT or os.path.basename(os.fspath(path)) != _NAME:
        return False
    _seen += 1
    return _seen == int(_NTH)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    import kinject.core.files

    real_replace, real_rename, real_append = os.replace, os.rename, kinject.core.files.append_jsonl

    def replace(src, dst, **kw):
        if _hit("replace", dst):
            _die()
        return real_replace(src, dst, **kw)

    def rename(src, dst, **kw):
        if _hit("replace", dst):
            _die()
        return real_rename(src, dst, **kw)

    def append_jsonl(path, records):
        if _EVENT == "torn" and _hit("torn", path):
            lines = [(json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records]
            with open(path, "ab") as f:
                f.write(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # dies inside the last line
                f.flush()
                os.fsync(f.fileno())
            _die()
        real_append(path, records)
        if _EVENT == "appended" and _hit("appended", path):
            os.kill(os.getpid(), signal.SIGSTOP)

    os.replace, os.rename = replace, rename
    # Stage modules import it by name when their command runs, after this.
    kinject.core.files.append_jsonl = append_jsonl


if __name__ == "__main__":
    if _EVENT:
        _install()
    from kinject.cli import main

    main(sys.argv[1:])
