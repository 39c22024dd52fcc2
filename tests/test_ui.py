"""The Gradio UI mounted at /ui in the real service (uvicorn on a free loopback port), driven by
`gradio_client` and by a headless Debian chromium, on a copy of the squad KB with a real
(untrained) LoRA adapter, on the bundled 135M model. Answers are kept short (24 new tokens)."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.conftest import attach_untrained_lora, shared_dataset
from tests.conftest import running

pytestmark = pytest.mark.shared_data

QID = "squad_dev_p1351_q1"  # "What is the size of the school's endowment?" (dev split)
GOLD = "squad_dev_p1351"  # its passage (Harvard University)
CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 240_000  # answers on a shared 2-core CPU
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-gpu",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def question() -> str:
    path = shared_dataset("squad_short") / "questions.jsonl"
    rec = next(r for r in map(json.loads, path.read_text().splitlines()) if r["qid"] == QID)
    assert rec["split"] == "dev" and rec["doc_ids"] == [GOLD]
    return rec["question"]


@pytest.fixture(scope="module")
def ui_kb(squad_kb, tmp_path_factory):
    """A private copy of the squad KB with an adapter recorded as trained on its index, so the
    ft modes exist and an upload makes the adapter stale, as after a real training run."""
    from kinject.core.kb import KB
    from kinject.core.settings import load_settings

    kb, _ = squad_kb
    root = tmp_path_factory.mktemp("ui-kbs")
    shutil.copytree(kb.root, root / kb.name, ignore=shutil.ignore_patterns(".lock"))
    # Short answers and two passages per prompt: fast on a CPU; the UI shows whatever top_k is.
    settings = load_settings({"kb_root": str(root), "serve": {"max_new_tokens": 24}, "retrieval": {"top_k": 2}})
    kb = KB.open(settings, kb.name)
    attach_untrained_lora(kb, settings)
    train = kb.stage("train")
    kb.record_stage("train", fingerprint=train["fingerprint"], inputs={"ingest": kb.stage("ingest")["fingerprint"]}, metrics=train["metrics"])
    return kb, settings


@pytest.fixture(scope="module")
def ui_url(ui_kb, engine):
    """The service app (API + UI at /ui) sharing the session's engine: no second model load."""
    from kinject.recipes.serve import service_app

    kb, settings = ui_kb
    with running(service_app(kb, settings, engine)) as url:
        yield url + "/ui/"


@pytest.fixture(scope="module")
def client(ui_url):
    from gradio_client import Client

    client = Client(ui_url, verbose=False)
    yield client
    client.close()


def split_chat(messages: list[dict]) -> tuple[str, dict[str, str]]:
    """(the answer's text, {note title: note text}) from the chat endpoint's messages."""
    answer = "".join(m["content"] for m in messages if not (m.get("metadata") or {}).get("title"))
    notes = {m["metadata"]["title"]: m["content"] for m in messages if (m.get("metadata") or {}).get("title")}
    return answer, notes


def test_endpoints_are_named(client):
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/chat", "/compare", "/upload", "/kb_info", "/modes"} <= named


@pytest.mark.parametrize("mode", ["base", "rag", "ft", "ft-rag", "auto"])
def test_chat_answers_in_each_mode(client, question, mode):
    client.reset_session()  # the chat endpoint keeps a per-session history; each mode starts afresh
    answer, notes = split_chat(client.predict(question, mode, api_name="/chat"))
    assert answer.strip()
    sources = next((text for title, text in notes.items() if title.startswith("Sources (")), "")
    if mode in ("rag", "ft-rag"):
        assert GOLD in sources and "score" in sources
    if mode in ("base", "ft"):
        assert not sources
    if mode == "auto":
        (routed,) = [t for t in notes if t.startswith("auto answered with ")]
        assert routed.removeprefix("auto answered with ") in ("base", "rag", "ft", "ft-rag")


def test_compare_returns_four_answers_with_latency_and_sources(client, question):
    out = client.predict(question, api_name="/compare")
    answers, metas = dict(zip(["base", "rag", "ft", "ft-rag"], out[:4])), dict(zip(["base", "rag", "ft", "ft-rag"], out[4:]))
    assert all(a.strip() for a in answers.values()), answers
    assert all("done in" in m and "tokens" in m for m in metas.values()), metas
    assert GOLD in metas["rag"] and GOLD in metas["ft-rag"]
    assert "Sources" not in metas["base"] and "Sources" not in metas["ft"]


def test_unbuilt_modes_are_labelled_and_refused(squad_kb, engine):
    """The shared squad KB has an index and no adapter: ft modes are marked and refused with
    the reason; the app also runs on its own (as `kinject ui` does), not only mounted."""
    from gradio_client import Client

    from kinject.core.answer import Answerer
    from kinject.ui.app import build_ui
    from kinject.ui.chat import mode_choices

    kb, settings = squad_kb
    answerer = Answerer(kb, settings, engine)
    blocked = answerer.unavailable()
    assert set(blocked) == {"ft", "ft-rag"}
    labels = dict((v, k) for k, v in mode_choices(blocked))
    assert labels["ft"] == "ft (unavailable)" and labels["rag"] == "rag"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    demo = build_ui(answerer, settings)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, note = client.predict(api_name="/modes")
        assert "**ft** unavailable: no adapter" in note
        with pytest.raises(Exception, match=r"mode 'ft' is not available for this KB: no adapter: run `kinject train --kb squad`"):
            client.predict("hello", "ft", api_name="/chat")
        client.close()
    finally:
        demo.close()


@pytest.mark.slow
def test_browser_chat_and_compare(ui_url, question, tmp_path):
    """Headless Debian chromium: chat in rag mode until the answer and a source show, then the
    compare tab with four answers and the rag answer's sources. Screenshots go to tmp_path."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium (`make browser` or apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(WAIT_MS)
            page.goto(ui_url)

            # Chat: pick rag, ask, wait for the answer and its sources.
            page.locator("#mode input").click()
            page.get_by_role("option", name="rag", exact=True).click()
            expect(page.locator("#mode input")).to_have_value("rag", timeout=WAIT_MS)
            box = page.get_by_placeholder("Ask a question…")
            box.fill(question)
            box.press("Enter")
            page.locator(".thought-group .title", has_text="Sources (").wait_for()  # shown with the first token
            expect(page.locator("button.stop-button")).to_have_count(0, timeout=WAIT_MS)  # the answer is complete
            assert page.locator('[data-testid="bot"]').first.inner_text().strip()
            expect(page.get_by_text(GOLD).first).to_be_visible(timeout=WAIT_MS)
            chat_png = tmp_path / "ui-chat.png"
            page.screenshot(path=str(chat_png), full_page=True)

            # Compare: four answers side by side, the rag column listing its sources.
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare-question textarea").fill(question)
            page.get_by_role("button", name="Compare").click()
            for mode in ("base", "rag", "ft", "ft-rag"):
                expect(page.locator(f"#meta-{mode}")).to_contain_text("done in", timeout=WAIT_MS)
                assert page.locator(f"#answer-{mode} textarea").input_value().strip()
            expect(page.locator("#meta-rag")).to_contain_text(GOLD, timeout=WAIT_MS)
            expect(page.locator("#meta-ft-rag")).to_contain_text(GOLD, timeout=WAIT_MS)
            page.locator("#meta-rag details").first.evaluate("e => e.open = true")
            compare_png = tmp_path / "ui-compare.png"
            page.screenshot(path=str(compare_png), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshots: {chat_png} {compare_png}")


def test_upload_indexes_at_once_reports_bad_files_and_marks_the_adapter_stale(client, ui_kb, tmp_path):
    """Runs last: it changes the module's KB."""
    from gradio_client import handle_file

    good = tmp_path / "zorblat.md"
    good.write_text("# Zorblat festival\n\nThe Zorblat festival is held every April in Quenmoor. Its founder was Ilsa Varnhout.\n")
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"this is not a pdf")
    report = client.predict([handle_file(str(good)), handle_file(str(bad))], api_name="/upload")
    assert "1 added" in report and "The index now holds 37 documents" in report
    assert "`broken.pdf`" in report  # refused by name, with the reader's reason after it
    assert report.split("`broken.pdf`:", 1)[1].strip()

    summary, documents, *_ = client.predict(api_name="/kb_info")
    assert "37 documents" in summary and "The adapter is stale" in summary
    assert "zorblat.md" in [row[0] for row in documents["data"]]

    client.reset_session()
    _, notes = split_chat(client.predict("Who founded the Zorblat festival?", "rag", api_name="/chat"))
    assert "zorblat.md" in next(text for title, text in notes.items() if title.startswith("Sources ("))


def test_kb_tab_shows_the_training_report_and_loss_curve(settings):
    """The adapter's report.json and loss.png (written by the finetune stage's own writers) appear
    in the KB tab; images go out as pictures, since Gradio serves no files from a KB folder."""
    from PIL import Image

    from kinject.core.kb import KB
    from kinject.finetune.report import write_loss_png, write_report
    from kinject.ui.kb_tab import kb_info

    kb = KB.create(settings, "tab")
    folder = kb.dir("train")
    write_report(folder, {"steps": 3, "final_loss": 2.5, "loss_curve": [[1, 3.0], [2, 2.7], [3, 2.5]], "adapter_dir": str(folder)})
    write_loss_png(folder, [[1, 3.0], [2, 2.7], [3, 2.5]], "tab")
    kb.record_stage("train", fingerprint="f", inputs={})
    summary, documents, adapter_md, loss, eval_md, chart = kb_info(kb)
    assert "No index yet" in summary and documents == []
    assert "| final_loss | 2.5 |" in adapter_md and "loss_curve" not in adapter_md and "adapter_dir" not in adapter_md
    served = Path(loss.value["path"])  # a copy in Gradio's own cache, which it does serve
    assert loss.visible and folder not in served.parents
    assert Image.open(served).size == Image.open(folder / "loss.png").size
    assert "No evaluation yet" in eval_md and chart.visible is False
