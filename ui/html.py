"""The HTML snippets the tabs show: sources that unfold to their snippets, status lines, errors
and the stale-stage warning. Every text from the KB or a model is escaped here."""
from __future__ import annotations

import html


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


def sources_block(sources: list[dict]) -> str:
    """The sources under a heading with their count; nothing when there are none."""
    if not sources:
        return ""
    return f'<div style="margin-top:.5em;font-size:.9em"><b>Sources ({len(sources)})</b>{sources_html(sources)}</div>'


def error_html(message: str) -> str:
    return f'<div style="color:#b42318">{html.escape(message)}</div>'


def status_html(line: str) -> str:
    return f'<div style="opacity:.75;font-size:.85em">{line}</div>'


def stale_html(what: str, changed: list[str], command: str) -> str:
    """A warning that `what` was made from outputs that have changed since, and what remakes it."""
    return (
        '<div style="border-left:4px solid #f79009;background:#fffaeb;color:#7a2e0e;padding:.6em .9em;border-radius:4px">'
        f"<b>{what} is stale</b>: the {', '.join(changed)} output changed since it was made. "
        f"Run <code>{command}</code> to bring it up to date.</div>"
    )
