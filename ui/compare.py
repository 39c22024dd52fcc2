"""The compare tab: one question answered by the four modes at once, each column streaming its
answer with its latency and sources."""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
import gradio as gr

from kinject.core.answer import MODES, Answerer, Prepared, source_dict
from kinject.core.errors import KinjectError
from kinject.core.policy import Slots
from kinject.core.settings import Settings
from kinject.service.streaming import stream_error
from kinject.ui.answering import generate, prepare
from kinject.ui.html import error_html, sources_block, status_html

LABELS = {  # short enough for one line in a quarter of the page
    "base": "base · model alone",
    "rag": "rag · retrieved passages",
    "ft": "ft · fine-tuned model",
    "ft-rag": "ft-rag · fine-tuned + passages",
}


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
            return error_html(self.error)
        if self.total_s is not None:
            first = f"first token {self.first_token_s:.2f} s · " if self.first_token_s is not None else ""
            line = f"{first}done in {self.total_s:.2f} s · {self.completion_tokens} tokens"
        elif self.first_token_s is not None:
            line = f"first token {self.first_token_s:.2f} s · streaming…"
        else:
            line = "waiting for the engine…"
        return status_html(line)

    def meta_html(self) -> str:
        return self.status_html() + sources_block(self.sources)


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


def compare_tab(answerer: Answerer, settings: Settings, slots: Slots) -> None:
    """The compare tab's parts and its event, inside the Blocks being built."""
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
                answers.append(gr.Textbox(label=LABELS.get(m, f"{m} · {MODES[m].description}"), lines=6, max_lines=14, interactive=False, elem_id=f"answer-{m}"))
                metas.append(gr.HTML(elem_id=f"meta-{m}"))
    gr.on(
        [ask.click, question.submit],
        make_compare(answerer, settings, slots),
        inputs=question,
        outputs=answers + metas,
        api_name="compare",
        show_progress="minimal",
    )
