"""The Gradio app: chat in one mode, compare the four modes side by side, see and grow the KB.

`build_ui(answerer, settings, slots)` only builds the Blocks; it answers through the `Answerer`
it is given, so the service mounts it at /ui on the engine it already loaded (`mount`), and
`kinject ui` runs it alone. Every generation takes one of the service's slots (core.policy.Slots), so
the UI and the API share `serve.max_concurrency` and `serve.max_queue`; Gradio's own queue holds
at most `serve.ui_max_queue` events. Every event has an explicit api_name so `gradio_client` can
call it.
"""
from __future__ import annotations

import asyncio
import html
import json
import stat
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import gradio as gr

from kinject.core.answer import ALL_MODES, AUTO, MODES, Answerer, Prepared, source_dict
from kinject.core.engines import SamplingParams
from kinject.core.errors import KinjectError
from kinject.core.kb import KB, STAGE_DIRS
from kinject.core.policy import Slots
from kinject.core.settings import Settings
from kinject.ingest.readers import Skipped
from kinject.service.streaming import in_thread, stream_error

COMPARE_LABELS = {  # short enough for one line in a quarter of the page
    "base": "base · model alone",
    "rag": "rag · retrieved passages",
    "ft": "ft · LoRA adapter",
    "ft-rag": "ft-rag · adapter + passages",
}


def sampling(settings: Settings) -> SamplingParams:
    """Greedy answers, so the same question gives the same answer in chat, compare and eval."""
    return SamplingParams(max_new_tokens=settings.serve.max_new_tokens, temperature=0.0, seed=settings.seed)


async def prepare(answerer: Answerer, settings: Settings, mode: str, conversation: list[dict]) -> Prepared:
    """Retrieve and build the request under the answering policy (core.policy), as the API and
    eval build it, so sources are known before the first token; in a worker thread."""
    return await anyio.to_thread.run_sync(lambda: answerer.prepare(mode, conversation, sampling(settings)))


async def generate(answerer: Answerer, slots: Slots, prepared: Prepared):
    """The answer's chunks, generated in one of the service's slots (Busy when the queue
    is full). Leaving early (stop pressed, page closed) cancels the generation and frees the slot."""
    cancel = threading.Event()
    async with slots.slot():
        async with aclosing(in_thread(answerer.stream_prepared(prepared, cancel), cancel)) as chunks:
            async for chunk in chunks:
                yield chunk


# ---- modes ----------------------------------------------------------------------------------
def default_mode(answerer: Answerer) -> str:
    available = answerer.available_modes()
    return AUTO if AUTO in available else (available[0] if available else "base")


def mode_choices(blocked: dict[str, str]) -> list[tuple[str, str]]:
    # A dropdown cannot disable one choice, so unavailable modes are labelled and refused when picked.
    return [(f"{m} (unavailable)" if m in blocked else m, m) for m in ALL_MODES]


def modes_note(blocked: dict[str, str]) -> str:
    if not blocked:
        return "All modes are available."
    return "\n".join(f"- **{m}** unavailable: {reason}" for m, reason in blocked.items())


# ---- chat -----------------------------------------------------------------------------------
def message_text(content) -> str:
    """The text of a chat message in any of Gradio's content shapes (str, text parts, files)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return " ".join(message_text(c) for c in content if isinstance(c, (str, dict))).strip()
    return ""


def conversation_from(history: list[dict], message: str) -> list[dict]:
    """The chat the model sees: user and assistant turns only; source and routing notes
    (messages with a metadata title) are for the reader, not the model."""
    turns = []
    for m in history or []:
        if (m.get("metadata") or {}).get("title") or m.get("role") not in ("user", "assistant"):
            continue
        text = message_text(m.get("content"))
        if text:
            turns.append({"role": m["role"], "content": text})
    return turns + [{"role": "user", "content": message}]


def sources_html(sources: list[dict]) -> str:
    """One line per source (title, doc_id, score) that unfolds to its snippet."""
    items = []
    for s in sources:
        page = f" · p. {s['page']}" if s.get("page") else ""
        items.append(
            '<details style="margin:.35em 0"><summary style="cursor:pointer">'
            f"<b>{html.escape(s['title'])}</b>"
            f'<div style="margin-left:1.1em;opacity:.7;font-size:.9em">{html.escape(str(s["doc_id"]))}{page} · score {s["score"]:.3f}</div>'
            f'</summary><p style="margin:.3em 0 .6em 1.1em">{html.escape(s["snippet"])}</p></details>'
        )
    return "".join(items)


def sources_message(sources: list[dict]) -> gr.ChatMessage:
    # No "status": the note opens unfolded, listing the sources; each one unfolds to its snippet.
    top = max(s["score"] for s in sources)
    return gr.ChatMessage(
        content=sources_html(sources),
        metadata={"title": f"Sources ({len(sources)})", "log": f"top score {top:.3f}"},
    )


def make_chat(answerer: Answerer, settings: Settings, slots: Slots):
    async def chat(message: str, history: list[dict], mode: str):
        if not (message or "").strip():
            raise gr.Error("Type a question first.")
        try:
            prepared = await prepare(answerer, settings, mode or default_mode(answerer), conversation_from(history, message))
        except KinjectError as e:
            raise gr.Error(str(e)) from None
        before, after = [], []
        if prepared.route_reason:
            before.append(gr.ChatMessage(content=prepared.route_reason, metadata={"title": f"auto answered with {prepared.mode}", "status": "done"}))
        if prepared.hits:
            after.append(sources_message([source_dict(h) for h in prepared.hits]))
        text = ""
        try:
            async with aclosing(generate(answerer, slots, prepared)) as chunks:
                async for chunk in chunks:
                    text += chunk.text
                    if chunk.text:
                        yield [*before, gr.ChatMessage(content=text), *after]
        except Exception as e:  # the queue full, or generation failed
            raise gr.Error(stream_error(e).message) from None
        yield [*before, gr.ChatMessage(content=text.strip() or "(the model returned an empty answer)"), *after]

    return chat


# ---- compare --------------------------------------------------------------------------------
@dataclass
class Column:
    """One mode's answer in the compare tab, as it streams."""

    mode: str
    text: str = ""
    sources: list[dict] = field(default_factory=list)
    error: str = ""
    first_token_s: float | None = None
    total_s: float | None = None
    completion_tokens: int = 0
    finish_reason: str = ""

    def status_html(self) -> str:
        if self.error:
            return f'<div style="color:#b42318">{html.escape(self.error)}</div>'
        if self.total_s is not None:
            first = f"first token {self.first_token_s:.2f} s · " if self.first_token_s is not None else ""
            line = f"{first}done in {self.total_s:.2f} s · {self.completion_tokens} tokens"
        elif self.first_token_s is not None:
            line = f"first token {self.first_token_s:.2f} s · streaming…"
        else:
            line = "waiting for the engine…"
        return f'<div style="opacity:.75;font-size:.85em">{line}</div>'

    def sources_block(self) -> str:
        if not self.sources:
            return ""
        return f'<div style="margin-top:.5em;font-size:.9em"><b>Sources ({len(self.sources)})</b>{sources_html(self.sources)}</div>'

    def meta_html(self) -> str:
        return self.status_html() + self.sources_block()


def make_compare(answerer: Answerer, settings: Settings, slots: Slots):
    async def compare(question: str):
        """Stream the four answers at once, each in its own slot: an engine that batches answers
        them together, one that serializes fills them in turn, and with fewer free slots the
        others wait in the service's queue (or show that it is full)."""
        if not (question or "").strip():
            raise gr.Error("Type a question first.")
        conversation = [{"role": "user", "content": question.strip()}]
        cols = {m: Column(m) for m in MODES}
        blocked = await anyio.to_thread.run_sync(answerer.unavailable)
        prepared: dict[str, Prepared] = {}
        for m, col in cols.items():
            if m in blocked:
                col.error = f"unavailable: {blocked[m]}"
                continue
            try:
                prepared[m] = await prepare(answerer, settings, m, conversation)
            except KinjectError as e:
                col.error = str(e)
                continue
            col.sources = [source_dict(h) for h in prepared[m].hits]

        def outputs():
            return [c.text for c in cols.values()] + [c.meta_html() for c in cols.values()]

        yield outputs()
        events: asyncio.Queue = asyncio.Queue()
        t0 = time.perf_counter()

        async def run(mode: str) -> None:
            """Feed one mode's stream into the shared queue, ending with (mode, None, error or None)."""
            error = None
            try:
                async with aclosing(generate(answerer, slots, prepared[mode])) as chunks:
                    async for chunk in chunks:
                        await events.put((mode, chunk, None))
            except Exception as e:  # shown in the mode's column
                error = stream_error(e).message
            await events.put((mode, None, error))

        tasks = [asyncio.create_task(run(m)) for m in prepared]
        running = len(tasks)
        try:
            while running:
                mode, chunk, error = await events.get()
                col = cols[mode]
                if chunk is None:  # this mode's stream has ended: one last update for its column
                    if error is not None:
                        col.error = error
                    running -= 1
                    col.total_s = time.perf_counter() - t0
                    col.text = col.text.strip()
                elif chunk.finish_reason is not None:
                    col.completion_tokens, col.finish_reason = chunk.completion_tokens, chunk.finish_reason
                    continue
                elif chunk.text:
                    if col.first_token_s is None:
                        col.first_token_s = time.perf_counter() - t0
                    col.text += chunk.text
                else:
                    continue
                yield outputs()
        finally:
            for task in tasks:  # the reader left or pressed stop: end every generation, free its slot
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return compare


# ---- KB -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _scalars(d: dict) -> dict:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (str, int, float, bool)) and v is not None}


def _table(rows: dict, head: tuple[str, str] = ("metric", "value")) -> str:
    if not rows:
        return ""
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def latest_eval(kb: KB) -> Path | None:
    """The newest run folder under eval/ that has a table.md."""
    root = kb.root / STAGE_DIRS["eval"]
    runs = [p for p in root.glob("*/table.md")] if root.exists() else []
    return max(runs, key=lambda p: p.stat().st_mtime).parent if runs else None


def synthetic_markdown(report: dict) -> str:
    """synthetic/report.json (written by augmentation): tokens by type, then its quality numbers."""
    lines = ["| type | samples | generated tokens | kept | kept tokens |", "|---|---:|---:|---:|---:|"]
    for name, row in (report.get("per_type") or {}).items():
        lines.append(f"| {name} | {row.get('samples', 0)} | {row.get('generated_tokens', 0)} | {row.get('kept', 0)} | {row.get('kept_tokens', 0)} |")
    lines.append(
        f"| **total** | **{report.get('samples', 0)}** | **{report.get('generated_tokens', 0)}** | **{report.get('kept', 0)}** | **{report.get('kept_tokens', 0)}** |"
    )
    quality = {
        "corpus tokens": report.get("corpus_tokens"),
        "expansion (kept / corpus)": f"{report['expansion']}x" if report.get("expansion") is not None else None,
        "drop rate": f"{report['drop_rate']:.0%}" if report.get("drop_rate") is not None else None,
        "distinct-2": report.get("distinct_2"),
        "faithfulness of kept samples": f"{report['faithfulness_kept']:.0%}" if report.get("faithfulness_kept") is not None else None,
    }
    facts = " · ".join(f"{k}: {v}" for k, v in quality.items() if v is not None)
    return "\n".join(lines) + (f"\n\n{facts}" if facts else "")


def kb_summary(kb: KB) -> str:
    """What the KB holds, per stage, with a warning on top when a stage is stale."""
    m = kb.manifest()
    stages = m.get("stages", {})
    parts = [f"LLM `{m['models'].get('llm')}` · embedder `{m['models'].get('embedder')}`"]
    for stage, changed in kb.stale().items():
        what = {"train": "The adapter", "augment": "The synthetic data", "eval": "The last evaluation"}.get(stage, f"The {stage} stage")
        extra = " --questions FILE" if stage == "eval" else ""
        parts.append(
            '<div style="border-left:4px solid #f79009;background:#fffaeb;color:#7a2e0e;padding:.6em .9em;border-radius:4px">'
            f"<b>{what} is stale</b>: the {', '.join(changed)} output changed since it was made. "
            f"Run <code>kinject {stage} --kb {kb.name}{extra}</code> to bring it up to date.</div>"
        )
    parts.append("### Index")
    ingest = stages.get("ingest")
    if ingest:
        out = ingest.get("outputs") or {}
        parts.append(f"**{out.get('documents', '?')} documents, {out.get('chunks', '?')} chunks** · updated {ingest.get('finished_at')}")
    else:
        parts.append(f"No index yet: add files here or run `kinject ingest CORPUS --kb {kb.name}`.")
    parts.append("### Synthetic data")
    report = _read_json(kb.root / STAGE_DIRS["augment"] / "report.json")
    if report:
        parts.append(synthetic_markdown(report))
    else:
        parts.append(f"No synthetic data yet: run `kinject augment --kb {kb.name}`.")
    return "\n\n".join(p for p in parts if p)


def documents_table(kb: KB) -> list[list]:
    if not kb.stage("ingest"):
        return []
    from kinject.core.index import load_documents

    return [[d.doc_id, d.title, len(d.text.split())] for d in load_documents(kb)]


def _image(path: Path):
    """A KB image as PIL: Gradio only serves files from its temp and working folders, and a KB
    usually lives elsewhere (~/.kinject/kbs)."""
    if not path.exists():
        return None
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def adapter_summary(kb: KB) -> tuple[str, object]:
    folder = kb.root / STAGE_DIRS["train"]
    train = kb.stage("train")
    if not train:
        return f"No adapter yet: run `kinject train --kb {kb.name}`.", None
    report = _read_json(folder / "report.json") or {}
    rows = _scalars(report) or _scalars(train.get("metrics"))
    for key in ("adapter_dir", "merged_dir", "skipped"):  # paths on the server, and a flag that is always False here
        rows.pop(key, None)
    return _table(rows) or "The adapter has no training report.", _image(folder / "loss.png")


def eval_summary(kb: KB) -> tuple[str, object]:
    run = latest_eval(kb)
    if run is None:
        return f"No evaluation yet: run `kinject eval --kb {kb.name} --questions FILE`.", None
    return f"Run `{run.name}`\n\n" + (run / "table.md").read_text(), _image(run / "chart.png")


def kb_info(kb: KB) -> tuple:
    """The KB tab's contents: summary, documents, adapter report and loss, last eval and chart."""
    adapter_md, loss_png = adapter_summary(kb)
    eval_md, chart_png = eval_summary(kb)
    return (
        kb_summary(kb),
        documents_table(kb),
        adapter_md,
        gr.Image(value=loss_png, visible=loss_png is not None, format="png"),
        eval_md,
        gr.Image(value=chart_png, visible=chart_png is not None, format="png"),
    )


# ---- upload ---------------------------------------------------------------------------------
def upload_report(report) -> str:
    """What the upload added and, by file name, what was refused and why."""
    done = [f"{len(report.added)} added"]
    if report.changed:
        done.append(f"{len(report.changed)} replaced")
    if report.unchanged:
        done.append(f"{report.unchanged} unchanged")
    lines = [
        f"**Documents: {', '.join(done)}** ({report.chunks_embedded} chunks embedded). "
        f"The index now holds {report.documents} documents, {report.chunks} chunks; rag modes use them from the next question."
    ]
    if report.rebuilt:
        lines.append(f"\nThe whole index was embedded again: {report.rebuilt}.")
    if report.skipped:
        lines.append("\n**Not added:**")
        lines += [f"- `{Path(s.path).name}`: {s.reason}" for s in report.skipped]
    if report.trimmed:
        lines.append("\n**Left out of the added documents:**")
        lines += [f"- `{Path(t.path).name}`: {t.what}" for t in report.trimmed]
    return "\n".join(lines)


def upload_limit(settings: Settings) -> int:
    return int(settings.serve.max_upload_mb * 2**20)


def accepted_upload(path: str | Path, upload_dir: str | Path, max_bytes: int) -> tuple[Path | None, str]:
    """(the file, "") for a regular file, at most max_bytes, that lies inside Gradio's upload
    folder once symlinks are resolved; else (None, why). An event names its files by server
    path, so without this any file the server can read could be pulled into the KB."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "not found"
    if Path(upload_dir).resolve() not in real.parents:
        return None, "not a file uploaded through this page"
    info = real.stat()
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"
    if info.st_size > max_bytes:
        return None, f"too large ({info.st_size / 2**20:.1f} MB > serve.max_upload_mb={max_bytes / 2**20:g})"
    return real, ""


def discard_upload(path: str | Path, upload_dir: str | Path) -> None:
    """Delete an uploaded temp file and the per-upload folder Gradio made for it; a path outside
    the upload folder is left alone."""
    real, root = Path(path).resolve(), Path(upload_dir).resolve()
    if root not in real.parents or not real.is_file():
        return
    real.unlink(missing_ok=True)
    if root in real.parent.parents:
        try:
            real.parent.rmdir()
        except OSError:  # another file is still in it
            pass


def make_upload(answerer: Answerer, settings: Settings, upload_dir: str):
    def upload(files: list[str] | None, progress=gr.Progress(track_tqdm=True)) -> str:
        if not files:
            raise gr.Error("Choose one or more files first.")
        from kinject.ingest.pipeline import add_files

        accepted, refused = [], []
        for f in files:
            real, why = accepted_upload(f, upload_dir, upload_limit(settings))
            if real is None:
                refused.append(Skipped(Path(f).name, why))
            else:
                accepted.append(real)
        try:
            if not accepted:
                raise gr.Error("Nothing was added: " + "; ".join(map(str, refused)))
            progress(0, desc=f"indexing {len(accepted)} file(s)")
            try:
                report = add_files(answerer.kb, accepted, settings, progress=True)
            except KinjectError as e:
                raise gr.Error(str(e)) from None
        finally:
            for f in files:  # the KB keeps its own copy (uploads/) of what it added
                discard_upload(f, upload_dir)
        report.skipped = refused + report.skipped
        return upload_report(report)

    return upload


# ---- the app --------------------------------------------------------------------------------
def build_ui(answerer: Answerer, settings: Settings, slots: Slots | None = None) -> gr.Blocks:
    """The Blocks for one KB, answering through `answerer` (no model is loaded here) in `slots`
    (the service's; `kinject ui` alone makes its own)."""
    kb = answerer.kb
    blocked = answerer.unavailable()
    slots = slots or Slots.from_settings(settings)

    def refresh_modes():
        # Choices only: the reader's pick stays as it is.
        now = answerer.unavailable()
        return gr.Dropdown(choices=mode_choices(now)), modes_note(now)

    # Gradio deletes, hourly, its temp files older than an hour: uploads never sent to "Add to KB".
    with gr.Blocks(title=f"kinject · {kb.name}", fill_height=True, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## kinject · {kb.name}")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=True):
                    mode = gr.Dropdown(
                        choices=mode_choices(blocked),
                        value=default_mode(answerer),
                        label="Mode",
                        elem_id="mode",
                        info="base: the model alone · rag: with retrieved passages · ft: with the KB's adapter · ft-rag: both · auto: picked per question",
                        scale=1,
                    )
                    note = gr.Markdown(modes_note(blocked))
                gr.ChatInterface(
                    make_chat(answerer, settings, slots),
                    additional_inputs=[mode],
                    chatbot=gr.Chatbot(height=480, placeholder=f"Ask about the documents in `{kb.name}`."),
                    textbox=gr.Textbox(placeholder="Ask a question…", submit_btn=True, stop_btn=True),
                    api_name="chat",
                    fill_height=False,
                    concurrency_limit=settings.serve.max_concurrency,
                )
            with gr.Tab("Compare", id="compare"):
                with gr.Row(equal_height=True):
                    question = gr.Textbox(
                        label="Question",
                        show_label=False,
                        container=False,
                        placeholder="One question, answered by all four modes",
                        scale=6,
                        elem_id="compare-question",
                    )
                    ask = gr.Button("Compare", variant="primary", scale=1)
                answers, metas = [], []
                with gr.Row(equal_height=False):
                    for m in MODES:
                        with gr.Column(min_width=220):
                            answers.append(gr.Textbox(label=COMPARE_LABELS.get(m, f"{m} · {MODES[m].description}"), lines=6, max_lines=14, interactive=False, elem_id=f"answer-{m}"))
                            metas.append(gr.HTML(elem_id=f"meta-{m}"))
                gr.on(
                    [ask.click, question.submit],
                    make_compare(answerer, settings, slots),
                    inputs=question,
                    outputs=answers + metas,
                    api_name="compare",
                    show_progress="minimal",
                )
            with gr.Tab("KB", id="kb"):
                with gr.Row():
                    with gr.Column(scale=3):
                        summary = gr.Markdown()
                        documents = gr.Dataframe(
                            headers=["doc_id", "title", "words"], label="Documents", interactive=False, max_height=320, wrap=True
                        )
                    with gr.Column(scale=2):
                        files = gr.File(label="Add files to the KB (.txt .md .html .pdf .jsonl)", file_count="multiple", type="filepath")
                        add = gr.Button("Add to KB", variant="primary")
                        upload_result = gr.Markdown()
                        refresh = gr.Button("Refresh", size="sm")
                gr.Markdown("### Adapter")
                with gr.Row():
                    adapter_md = gr.Markdown()
                    loss_png = gr.Image(label="Training loss", type="pil", interactive=False, visible=False, height=360)
                gr.Markdown("### Last evaluation")
                with gr.Row():
                    eval_md = gr.Markdown()
                with gr.Row():
                    chart_png = gr.Image(label="Scores by mode", type="pil", interactive=False, visible=False, height=420)

        kb_outputs = [summary, documents, adapter_md, loss_png, eval_md, chart_png]
        load_kb = lambda: kb_info(kb)  # noqa: E731
        demo.load(load_kb, outputs=kb_outputs, api_name="kb_info")
        demo.load(refresh_modes, outputs=[mode, note], api_name="modes", show_progress="hidden")
        refresh.click(load_kb, outputs=kb_outputs, api_visibility="private")
        add.click(make_upload(answerer, settings, demo.GRADIO_CACHE), inputs=files, outputs=upload_result, api_name="upload").then(
            load_kb, outputs=kb_outputs, api_visibility="private"
        ).then(refresh_modes, outputs=[mode, note], api_visibility="private")
    return demo.queue(max_size=settings.serve.ui_max_queue)


def mount(app, answerer: Answerer, settings: Settings, slots: Slots, path: str, auth=None) -> gr.Blocks:
    """Mount the UI on the service's FastAPI app at `path`, sharing its slots."""
    blocks = build_ui(answerer, settings, slots)
    gr.mount_gradio_app(app, blocks, path=path, auth=auth, max_file_size=upload_limit(settings))
    # Only launch() sets has_launched, and Gradio checks that the files an event names were
    # uploaded (are inside its upload folder) only for launched apps; a mounted one would copy
    # any path the server can read into its cache, /dev/zero forever on the event loop.
    blocks.has_launched = True
    return blocks
