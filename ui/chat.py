"""The chat tab: a conversation answered in one mode, streamed, with the sources it used folded
under the answer and, for `auto`, the mode the router picked above it."""
from __future__ import annotations

from contextlib import aclosing

import gradio as gr

from kinject.core.answer import ALL_MODES, AUTO, Answerer, source_dict
from kinject.core.errors import KinjectError
from kinject.core.policy import Slots
from kinject.core.settings import Settings
from kinject.service.streaming import stream_error
from kinject.ui.answering import generate, prepare
from kinject.ui.html import sources_html

MODES_INFO = "base: the model alone · rag: with retrieved passages · ft: with the KB's adapter · ft-rag: both · auto: picked per question"


# ---- modes --------------------------------------------------------------------------------------
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


# ---- the conversation ---------------------------------------------------------------------------
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


# ---- the tab ------------------------------------------------------------------------------------
def chat_tab(answerer: Answerer, settings: Settings, slots: Slots, blocked: dict[str, str]) -> tuple[gr.Dropdown, gr.Markdown]:
    """The chat tab's parts, inside the Blocks being built; returns the mode picker and its note,
    which the app refreshes when the KB changes."""
    with gr.Row(equal_height=True):
        mode = gr.Dropdown(
            choices=mode_choices(blocked),
            value=default_mode(answerer),
            label="Mode",
            elem_id="mode",
            info=MODES_INFO,
            scale=1,
        )
        note = gr.Markdown(modes_note(blocked))
    gr.ChatInterface(
        make_chat(answerer, settings, slots),
        additional_inputs=[mode],
        chatbot=gr.Chatbot(height=480, placeholder=f"Ask about the documents in `{answerer.kb.name}`."),
        textbox=gr.Textbox(placeholder="Ask a question…", submit_btn=True, stop_btn=True),
        api_name="chat",
        fill_height=False,
        concurrency_limit=settings.serve.max_concurrency,
    )
    return mode, note
