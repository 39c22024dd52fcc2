"""The KB tab: what the KB holds (index, synthetic data, adapter, last evaluation), with a
warning for stale stages, and files added to it from the page."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from kinject.core.answer import Answerer
from kinject.core.kb import KB, STAGE_DIRS
from kinject.core.settings import Settings
from kinject.ui.html import stale_html
from kinject.ui.upload import make_upload


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
        parts.append(stale_html(what, changed, f"kinject {stage} --kb {kb.name}{extra}"))
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


# ---- the tab ------------------------------------------------------------------------------------
@dataclass
class KBTab:
    outputs: list  # what kb_info fills, in its order
    refresh: gr.Button
    add: gr.Button
    files: gr.File
    upload_result: gr.Markdown


def kb_tab() -> KBTab:
    """The KB tab's parts, inside the Blocks being built; `wire_kb_tab` gives them their events."""
    with gr.Row():
        with gr.Column(scale=3):
            summary = gr.Markdown()
            documents = gr.Dataframe(headers=["doc_id", "title", "words"], label="Documents", interactive=False, max_height=320, wrap=True)
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
    return KBTab([summary, documents, adapter_md, loss_png, eval_md, chart_png], refresh, add, files, upload_result)


def wire_kb_tab(demo: gr.Blocks, tab: KBTab, answerer: Answerer, settings: Settings):
    """The tab's events: filled on page load and on Refresh, and filled again after an upload.
    Returns the upload's last event, for the app to chain what else an upload changes."""
    load_kb = lambda: kb_info(answerer.kb)  # noqa: E731
    demo.load(load_kb, outputs=tab.outputs, api_name="kb_info")
    tab.refresh.click(load_kb, outputs=tab.outputs, api_visibility="private")
    return tab.add.click(make_upload(answerer, settings, demo.GRADIO_CACHE), inputs=tab.files, outputs=tab.upload_result, api_name="upload").then(
        load_kb, outputs=tab.outputs, api_visibility="private"
    )
