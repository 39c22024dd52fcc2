"""The Gradio app: chat in one mode, compare the four modes side by side, see and grow the KB.

`build_ui(answerer, settings, slots)` only assembles the tabs (ui.chat, ui.compare, ui.kb_tab);
it answers through the `Answerer` it is given, so the service mounts it at /ui on the engine it
already loaded (`mount`), and `kinject ui` runs it alone. Every generation takes one of the
service's slots (core.policy.Slots), so the UI and the API share `serve.max_concurrency` and
`serve.max_queue`; Gradio's own queue holds at most `serve.ui_max_queue` events. Every event has
an explicit api_name so `gradio_client` can call it.
"""
from __future__ import annotations

import gradio as gr

from kinject.core.answer import Answerer
from kinject.core.policy import Slots
from kinject.core.settings import Settings
from kinject.ui.chat import chat_tab, mode_choices, modes_note
from kinject.ui.compare import compare_tab
from kinject.ui.kb_tab import kb_tab, wire_kb_tab
from kinject.ui.upload import upload_limit

__all__ = ["build_ui", "mount", "upload_limit"]


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
                mode, note = chat_tab(answerer, settings, slots, blocked)
            with gr.Tab("Compare", id="compare"):
                compare_tab(answerer, settings, slots)
            with gr.Tab("KB", id="kb"):
                kb_parts = kb_tab()

        uploaded = wire_kb_tab(demo, kb_parts, answerer, settings)
        demo.load(refresh_modes, outputs=[mode, note], api_name="modes", show_progress="hidden")
        uploaded.then(refresh_modes, outputs=[mode, note], api_visibility="private")  # an upload can make rag modes available
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
