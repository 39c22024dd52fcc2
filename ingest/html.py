"""HTML -> the text a browser shows, in one streaming pass.

No tree is built: the parser keeps only the stack of open elements, so memory grows with the
nesting depth (capped by `max_depth`) and the visible text, never with the number of tags.
Text a browser does not render is dropped and counted: <script>, <style>, <template>,
<noscript>, <svg>, a closed <dialog>, the `hidden` attribute, and inline `display: none` or
`visibility: hidden` (which a descendant may undo with `visibility: visible`). `aria-hidden`
only hides from screen readers, so that text stays. Stylesheet rules are not evaluated.

Elements nest as in BeautifulSoup's html.parser tree (an end tag closes up to its open match),
plus the implied end tags that matter for hiding: a block start closes an open <p>, and a new
<li>, <dt>/<dd>, <option>, <tr> or <td>/<th> closes its open sibling.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "meta", "param", "source", "track", "wbr"}
NOT_RENDERED = {"script", "style", "template", "noscript", "svg"}
CLOSES_P = {
    "address", "article", "aside", "blockquote", "details", "dialog", "div", "dl", "fieldset", "figcaption", "figure",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hgroup", "hr", "main", "menu", "nav", "ol", "p",
    "pre", "section", "table", "ul",
}  # fmt: skip
SCOPE = {"html", "table", "td", "th", "caption", "template", "button", "object", "marquee", "applet"}
# start tag -> (open elements it closes, elements that stop the search)
SIBLINGS = {
    "li": ({"li"}, SCOPE | {"ul", "ol"}),
    "dt": ({"dt", "dd"}, SCOPE | {"dl"}),
    "dd": ({"dt", "dd"}, SCOPE | {"dl"}),
    "option": ({"option"}, SCOPE | {"select", "datalist", "optgroup"}),
    "tr": ({"tr", "td", "th"}, (SCOPE - {"td", "th"}) | {"tbody", "thead", "tfoot"}),
    "td": ({"td", "th"}, (SCOPE - {"td", "th"}) | {"tr"}),
    "th": ({"td", "th"}, (SCOPE - {"td", "th"}) | {"tr"}),
}
HEADINGS = {"h1", "h2", "h3"}


class TooDeep(ValueError):
    pass


@dataclass
class VisibleText:
    title: str
    text: str  # text nodes joined by newlines, not yet normalized
    hidden: Counter = field(default_factory=Counter)  # why -> hidden elements dropped (outermost only)
    hidden_chars: int = 0


@dataclass
class _Open:
    tag: str
    display_none: bool  # this element or an ancestor is not rendered at all
    invisible: bool  # the visibility in effect here


def _style(value: str) -> dict[str, str]:
    out = {}
    for decl in value.split(";"):
        name, sep, val = decl.partition(":")
        if sep:
            out[name.strip().lower()] = val.lower().replace("!important", "").strip()
    return out


def _why_hidden(tag: str, attrs: dict[str, str | None]) -> tuple[str | None, bool | None]:
    """(why the element is not rendered or None, its own visibility: True hidden, False visible, None inherit)."""
    style = _style(attrs.get("style") or "")
    visibility = style.get("visibility")
    own = True if visibility in ("hidden", "collapse") else False if visibility == "visible" else None
    if tag in NOT_RENDERED:
        return tag, own
    if "hidden" in attrs and (attrs["hidden"] or "").strip().lower() != "until-found":
        return "hidden attribute", own
    if style.get("display") == "none":
        return "display:none", own
    if tag == "dialog" and "open" not in attrs:
        return "closed dialog", own
    return None, own


class _Extractor(HTMLParser):
    def __init__(self, max_depth: int):
        super().__init__(convert_charrefs=True)
        self.max_depth = max_depth
        self.stack: list[_Open] = []
        self.where: dict[str, list[int]] = {}  # tag -> its stack positions, ascending
        self.parts: list[str] = []
        self.title_parts: list[str] | None = None  # collecting while inside <title>
        self.title = ""
        self.heading: list[str] | None = None
        self.heading_tag = ""
        self.first_heading = ""
        self.hidden: Counter = Counter()
        self.hidden_chars = 0

    def _hidden(self) -> bool:
        top = self.stack[-1] if self.stack else None
        return bool(top and (top.display_none or top.invisible))

    # Positions are kept per tag so that no lookup walks the stack: a page of 500 nested
    # elements and a million siblings costs a million steps, not 500 million.
    def _top(self, tags) -> int:
        return max((self.where[t][-1] for t in tags if self.where.get(t)), default=-1)

    def _truncate(self, i: int) -> None:
        for entry in self.stack[i:]:
            self.where[entry.tag].pop()
        del self.stack[i:]

    def _close(self, tag: str) -> None:
        i = self._top((tag,))
        if i >= 0:
            self._truncate(i)

    def _close_implied(self, tag: str) -> None:
        closes, stops = SIBLINGS.get(tag, ({"p"}, SCOPE) if tag in CLOSES_P else ((), ()))
        i = self._top(closes)
        if i >= 0 and i > self._top(stops):
            self._truncate(i)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title" and not self.title and self.title_parts is None:
            self.title_parts = []
        if tag in VOID:
            return
        self._close_implied(tag)
        if len(self.stack) >= self.max_depth:
            raise TooDeep(f"HTML nested deeper than ingest.max_html_depth={self.max_depth}")
        why, own = _why_hidden(tag, dict(attrs))
        parent = self.stack[-1] if self.stack else _Open("", False, False)
        entry = _Open(tag, parent.display_none or why is not None, parent.invisible if own is None else own)
        if (entry.display_none or entry.invisible) and not (parent.display_none or parent.invisible):
            self.hidden[why or "visibility:hidden"] += 1
        self.where.setdefault(tag, []).append(len(self.stack))
        self.stack.append(entry)
        if tag in HEADINGS and not self.first_heading and self.heading is None and not self._hidden():
            self.heading, self.heading_tag = [], tag

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.title_parts is not None:
            self.title, self.title_parts = " ".join(self.title_parts), None
        if tag == self.heading_tag and self.heading is not None:
            self.first_heading, self.heading = " ".join(self.heading), None
        if tag not in VOID:
            self._close(tag)

    def handle_data(self, data: str) -> None:
        if self.title_parts is not None:
            self.title_parts.append(data)
        elif self._hidden():
            self.hidden_chars += len(data.strip())
        else:
            self.parts.append(data)
            if self.heading is not None:
                self.heading.append(data)


def visible_text(html: str, max_depth: int) -> VisibleText:
    """The title (<title>, else the first visible h1-h3) and the text a browser renders; raises
    TooDeep when elements nest deeper than max_depth."""
    parser = _Extractor(max_depth)
    parser.feed(html)
    parser.close()
    title = parser.title or parser.first_heading or (" ".join(parser.heading) if parser.heading else "")
    return VisibleText(title=title, text="\n".join(parser.parts), hidden=parser.hidden, hidden_chars=parser.hidden_chars)
