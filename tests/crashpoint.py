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

`forked(argv, env, log)` runs the same in a child process forked from a server that has already
imported torch, transformers, sentence-transformers, peft, FAISS and llama-index: a real process
that writes real files and dies by a real SIGKILL, without the 5-10 s of imports each fresh
interpreter spends (the tests start about twenty of them). What it does not cover is the start-up
of a fresh interpreter, so kills meant to land there use `python tests/crashpoint.py`.
"""
from __future__ import annotations

import atexit
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

# Imported once by the fork server; each child gets them already loaded. kinject's own modules are
# left out: they import in well under a second, and each child imports them fresh.
PRELOAD = ["numpy", "torch", "transformers", "peft", "accelerate", "safetensors", "sentence_transformers", "faiss", "llama_index.core", "typer", "pydantic_settings"]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Arm the kill point `EVENT:NAME:N` in this process."""
    event, name, nth = (spec.split(":") + ["", "", "0"])[:3]
    seen = [0]

    def hit(ev: str, path) -> bool:
        if ev != event or os.path.basename(os.fspath(path)) != name:
            return False
        seen[0] += 1
        return seen[0] == int(nth)

    import kinject.core.files

    real_replace, real_rename, real_append = os.replace, os.rename, kinject.core.files.append_jsonl

    def replace(src, dst, **kw):
        if hit("replace", dst):
            _die()
        return real_replace(src, dst, **kw)

    def rename(src, dst, **kw):
        if hit("replace", dst):
            _die()
        return real_rename(src, dst, **kw)

    def append_jsonl(path, records):
        if event == "torn" and hit("torn", path):
            lines = [(json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records]
            with open(path, "ab") as f:
                f.write(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # dies inside the last line
                f.flush()
                os.fsync(f.fileno())
            _die()
        real_append(path, records)
        if event == "appended" and hit("appended", path):
            os.kill(os.getpid(), signal.SIGSTOP)

    os.replace, os.rename = replace, rename
    # Stage modules bind it by name on import: patch it there too, whether imported yet or not.
    kinject.core.files.append_jsonl = append_jsonl
    for modname, module in list(sys.modules.items()):
        if modname.startswith("kinject.") and vars(module).get("append_jsonl") is real_append:
            module.append_jsonl = append_jsonl


# ---- children forked from a preloaded server ---------------------------------------------------
_start_lock = threading.Lock()


def _context():
    """The forkserver context, its server started once per test session with PRELOAD imported,
    and with OMP_NUM_THREADS=1 (OpenMP reads it when torch is loaded, which is in the server)."""
    ctx = multiprocessing.get_context("forkserver")
    with _start_lock:
        ctx.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    return ctx


def _child(argv: list[str], env: dict, log: str, cwd: str, crash: str | None) -> None:
    """In the forked child: the environment, working folder and output of a fresh `kinject`
    process (unbuffered, as with PYTHONUNBUFFERED), the kill point armed, then the CLI."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    if crash:
        install(crash)
    from kinject.cli import main

    main(argv)


_started: list = []


def _kill_leftovers() -> None:
    """At exit, SIGKILL the children a failed test left behind, stopped ones included (a stopped
    child ignores the SIGTERM multiprocessing sends, and its join would then never end)."""
    for proc in _started:
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)


class Forked:
    """`kinject ARGV` forked from the preloaded server, output appended to `log`; the parts of
    subprocess.Popen the tests use."""

    def __init__(self, argv: list[str], env: dict, log: Path, cwd: Path, crash: str | None = None):
        ctx = _context()
        with _start_lock:  # one fork request at a time, whichever thread asks
            self._proc = ctx.Process(target=_child, args=(list(argv), dict(env), str(log), str(cwd), crash), daemon=True)
            self._proc.start()
            if not _started:
                atexit.register(_kill_leftovers)  # after multiprocessing's own exit handler, so it runs first
            _started.append(self._proc)
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        """None while running; then the exit status, or -N for a death by signal N."""
        return self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(f"kinject (pid {self.pid})", timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def forked(argv: list[str], env: dict, log: Path, cwd: Path, crash: str | None = None) -> Forked:
    return Forked(argv, env, log, cwd, crash)


if __name__ == "__main__":
    if os.environ.get("KINJECT_CRASH_AT"):
        install(os.environ["KINJECT_CRASH_AT"])
    from kinject.cli import main

    main(sys.argv[1:])
