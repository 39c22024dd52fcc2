"""Attacks on the UI of a default `kinject serve --kb demo` (no API key), from outside: the real
server in a child process, driven over HTTP through Gradio's own API routes, as a script would.

Gradio names an event's files by their path on the server; a mounted app must accept only what
was uploaded to it, bounded in size, and a UI generation must queue for the same slots as the API.
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import copy_kb
from test_api_abuse import kinject_serve

CANARY = "The vault code of the Quillon archive is 7341-ZEBRA."
LONG = "Count from 1 to 200, separated by commas."  # answered up to serve.max_new_tokens
CHAT = {"model": "kinject-base", "messages": [{"role": "user", "content": LONG}], "max_tokens": 64}
SETS = (
    "serve.max_concurrency=1",  # one slot, no queue: a busy slot shows as a refusal at once
    "serve.max_queue=0",
    "serve.max_new_tokens=64",
    "serve.max_upload_mb=1",
    "serve.ui_max_queue=1",
    "retrieval.top_k=2",
)


@pytest.fixture(scope="module")
def site(demo_index, tmp_path_factory):
    """(url, kb_root, gradio temp dir): the demo documents indexed (a copy of the session's demo
    index, no adapter), served by `kinject serve`."""
    root = tmp_path_factory.mktemp("ui-abuse")
    copy_kb(demo_index, root / "kbs", "demo")
    gradio_tmp = root / "gradio"
    with kinject_serve(root / "kbs", root / "serve.log", *SETS, env={"GRADIO_TEMP_DIR": str(gradio_tmp)}) as (url, _):
        yield url, root / "kbs", gradio_tmp


def gradio(url: str) -> str:
    return url + "/ui/gradio_api"


def file_data(path: str, name: str | None = None) -> dict:
    return {"path": path, "orig_name": name or Path(path).name, "meta": {"_type": "gradio.FileData"}}


def call(url: str, api: str, data: list, timeout: float = 300) -> tuple[str, object]:
    """Gradio's two-step API: POST the inputs, then read the event stream to its end. Returns
    ("complete", outputs) or ("error", message)."""
    r = httpx.post(f"{gradio(url)}/call/{api}", json={"data": data}, timeout=60)
    assert r.status_code == 200, r.text
    event = None
    with httpx.stream("GET", f"{gradio(url)}/call/{api}/{r.json()['event_id']}", timeout=timeout) as s:
        for line in s.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event in ("complete", "error"):
                data = json.loads(line[len("data: ") :])
                return event, (data or {}).get("error") if event == "error" and isinstance(data, dict) else data
    raise AssertionError(f"the {api} stream ended without a result")


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def wait_until(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def in_background(fn, *args):
    """Run fn(*args) in a thread; yields a list that holds its result once it has returned."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    try:
        yield out
    finally:
        thread.join(300)


def indexed(kb_root: Path) -> dict[str, str]:
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings
    from kinject.ingest.pipeline import load_documents

    return {d.doc_id: d.text for d in load_documents(KB.open(load_settings({"kb_root": str(kb_root)}), "demo"))}


# ---- the upload handler's own check (no server) ----------------------------------------------
def test_only_regular_uploaded_files_within_the_limit_are_accepted_and_discarded(tmp_path):
    from kinject.ui.upload import accepted_upload, discard_upload

    uploads, outside = tmp_path / "gradio", tmp_path / "private"
    (uploads / "a1b2").mkdir(parents=True)
    outside.mkdir()
    good = uploads / "a1b2" / "notes.md"
    good.write_text("# Notes\n\nfine")
    (outside / "id_rsa.md").write_text("secret")
    (uploads / "a1b2" / "link.md").symlink_to(outside / "id_rsa.md")
    (uploads / "big.md").write_bytes(b"x" * 2000)
    os.mkfifo(uploads / "a1b2" / "pipe.md")

    assert accepted_upload(good, uploads, 1000) == (good.resolve(), "")
    assert accepted_upload(outside / "id_rsa.md", uploads, 1000) == (None, "not a file uploaded through this page")
    assert accepted_upload(uploads / "a1b2" / "link.md", uploads, 1000) == (None, "not a file uploaded through this page")
    assert accepted_upload(f"{uploads}/a1b2/../../private/id_rsa.md", uploads, 1000) == (None, "not a file uploaded through this page")
    assert accepted_upload(uploads / "a1b2" / "pipe.md", uploads, 1000) == (None, "not a regular file")
    assert accepted_upload(uploads / "big.md", uploads, 1000)[1].startswith("too large (0.0 MB > serve.max_upload_mb=")
    assert accepted_upload(uploads / "none.md", uploads, 1000) == (None, "not found")
    assert accepted_upload("/dev/zero", uploads, 1000) == (None, "not a file uploaded through this page")

    for path in (outside / "id_rsa.md", uploads / "a1b2" / "link.md", uploads / "big.md", good):
        discard_upload(path, uploads)
    assert (outside / "id_rsa.md").exists()  # never deleted through a link or a path outside
    assert not (uploads / "big.md").exists() and not good.exists() and (uploads / "a1b2").exists()  # the link is still in it


# ---- over HTTP -------------------------------------------------------------------------------
def test_an_upload_naming_a_server_file_is_refused_and_the_file_never_retrievable(site, tmp_path):
    url, kb_root, gradio_tmp = site
    private = tmp_path / "private"
    private.mkdir()
    canary = private / "canary.md"
    canary.write_text(f"# Quillon archive\n\n{CANARY}\n")
    escape = f"{gradio_tmp}/{'../' * len(gradio_tmp.parts)}{str(canary).lstrip('/')}"  # from inside the upload folder
    targets = [str(canary), escape, str(kb_root / "demo" / "manifest.json"), "/etc/passwd"]
    for target in targets:
        event, message = call(url, "upload", [[file_data(target, "canary.md")]])
        assert event == "error" and "not uploaded by a user" in str(message), (target, event, message)

    assert "canary.md" not in indexed(kb_root) and not any("7341" in text for text in indexed(kb_root).values())
    assert not (kb_root / "demo" / "uploads").exists()
    copies = [p for p in gradio_tmp.rglob("*") if p.is_file() and b"7341-ZEBRA" in p.read_bytes()]
    assert copies == []  # not even copied into Gradio's cache
    ask = {"model": "kinject-rag", "messages": [{"role": "user", "content": "What is the vault code of the Quillon archive?"}], "max_tokens": 1}
    r = httpx.post(url + "/v1/chat/completions", json=ask, timeout=300)
    assert r.status_code == 200, r.text
    assert all("7341" not in s["snippet"] and "canary" not in s["doc_id"] for s in r.json()["sources"])


def test_uploads_are_bounded_kept_in_the_kb_cleaned_up_and_never_replace(site):
    url, kb_root, _ = site
    r = httpx.post(f"{gradio(url)}/upload", files={"files": ("big.md", b"# Big\n\n" + b"word " * 400_000)}, timeout=60)
    assert r.status_code == 413, (r.status_code, r.text[:200])  # 2 MB > serve.max_upload_mb=1

    ferry = b"# Ferry timetable\n\nThe Orlenne ferry leaves the harbour at 7:15 every morning.\n"
    (temp,) = httpx.post(f"{gradio(url)}/upload", files={"files": ("ferry.md", ferry)}, timeout=60).json()
    event, (report,) = call(url, "upload", [[file_data(temp)]])
    assert event == "complete" and "**Documents: 1 added**" in report, report
    assert not Path(temp).exists() and not Path(temp).parent.exists()  # the temp copy is gone...
    assert (kb_root / "demo" / "uploads" / "ferry.md").read_bytes() == ferry  # ...the KB keeps its own
    assert "7:15" in indexed(kb_root)["ferry.md"]

    (temp,) = httpx.post(f"{gradio(url)}/upload", files={"files": ("ferry.md", ferry.replace(b"7:15", b"6:50"))}, timeout=60).json()
    event, (report,) = call(url, "upload", [[file_data(temp)]])
    assert event == "complete" and "**Documents: 0 added**" in report and "`ferry.md`: a file with this name was already uploaded" in report, report
    assert "7:15" in indexed(kb_root)["ferry.md"] and not Path(temp).exists()


def test_ui_and_api_generations_share_the_slots(site):
    url = site[0]
    assert health(url)["active"] == 0
    with in_background(call, url, "chat", [LONG, "base"]) as ui:
        wait_until(lambda: health(url)["active"] == 1 or ui, "the UI chat to take the slot")
        assert not ui, f"the UI answered without taking a slot: {ui}"
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=300)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
    assert ui[0][0] == "complete"

    with in_background(lambda: httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=300)) as api:
        wait_until(lambda: health(url)["active"] == 1 or api, "the API request to take the slot")
        event, message = call(url, "chat", ["Hello", "base"])
        assert event == "error" and "the server is busy" in str(message), (event, message)
    assert api[0].status_code == 200


def test_compare_streams_each_take_a_slot(site):
    url = site[0]
    event, out = call(url, "compare", ["Who founded the Brightwater glassworks?"])
    assert event == "complete"
    metas = dict(zip(["base", "rag", "ft", "ft-rag"], out[4:]))
    busy = [m for m in ("base", "rag") if "the server is busy" in metas[m]]
    answered = [m for m in ("base", "rag") if "done in" in metas[m] and "tokens" in metas[m]]
    assert len(busy) == 1 and len(answered) == 1, metas  # one slot, no queue: the other mode is refused
    assert health(url)["active"] == 0


def test_gradio_queue_is_bounded(site):
    url = site[0]
    codes, accepted = [], []

    def post():
        r = httpx.post(f"{gradio(url)}/call/chat", json={"data": [LONG, "base"]}, timeout=60)
        codes.append(r.status_code)
        if r.status_code == 200:
            accepted.append(r.json()["event_id"])
        else:
            assert "Queue is full" in r.text, r.text

    threads = [threading.Thread(target=post) for _ in range(5)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert 503 in codes, codes  # serve.ui_max_queue=1: one running, one waiting, the rest refused
    for event_id in accepted:  # let the accepted ones finish before the next test
        with httpx.stream("GET", f"{gradio(url)}/call/chat/{event_id}", timeout=300) as s:
            for _ in s.iter_lines():
                pass
    wait_until(lambda: health(url)["active"] == 0, "the slot to be free")


def test_dev_zero_named_as_an_upload_does_not_hang_the_server(site):
    """Last: before the fix the server copied /dev/zero into its cache on the event loop, forever."""
    url = site[0]
    with in_background(call, url, "upload", [[file_data("/dev/zero", "zero.md")]], 30) as result:
        time.sleep(1)
        t0 = time.monotonic()
        assert health(url)["status"] == "ok" and time.monotonic() - t0 < 10
    assert result, "no answer within 30 s"
    event, message = result[0]
    assert event == "error" and "not uploaded by a user" in str(message)
