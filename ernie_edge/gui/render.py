"""Markdown -> the HTML subset Qt's rich text understands, with highlighted code blocks. No Qt.

Qt's QTextDocument takes HTML 4 with inline styles (no CSS classes, no flexbox), so: pygments
writes inline styles, a code block is a one-cell table (it gets a background and a border), and
its "Copy" link is an anchor `copy:N` that the view maps back to `code_blocks[N]`. Raw HTML in the
model's answer is shown as text, never interpreted.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.util import ClassNotFound

COPY_SCHEME = "copy"
# Longer code blocks are shown uncolored: highlighting one and laying out its styled HTML costs
# ~0.3 ms a line on the UI thread (a 600-line block: ~180 ms, a visible stall).
HIGHLIGHT_MAX_LINES = 150


@dataclass(frozen=True)
class Colors:
    """The few colors the HTML needs (the rest comes from the widget palette)."""

    code_bg: str
    code_border: str
    muted: str
    link: str
    pygments_style: str


LIGHT = Colors(code_bg="#f4f5f7", code_border="#d9dce1", muted="#6a737d", link="#2463eb", pygments_style="default")
DARK = Colors(code_bg="#1c1f24", code_border="#3a3f47", muted="#9aa3ad", link="#6ea8fe", pygments_style="monokai")


@dataclass
class Rendered:
    html: str
    code_blocks: list[str]  # the raw text of each code block, for its Copy link


class MarkdownRenderer:
    def __init__(self, colors: Colors = LIGHT):
        self.set_colors(colors)
        self.md = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True})
        self.md.enable(["table", "strikethrough"])
        rules = self.md.renderer.rules
        rules["fence"] = self._fence
        rules["code_block"] = self._fence
        rules["code_inline"] = self._code_inline
        rules["table_open"] = lambda *a: '<table border="1" cellspacing="0" cellpadding="4">\n'
        self._blocks: list[str] = []
        self._first = 0
        self._highlight = True

    def set_colors(self, colors: Colors) -> None:
        """Switch light / dark (code colors included) for what is rendered next."""
        self.colors = colors
        self._formatter = HtmlFormatter(nowrap=True, noclasses=True, style=colors.pygments_style)

    def render(self, text: str, first_block: int = 0, highlight: bool = True) -> Rendered:
        """text -> HTML; code blocks are numbered from first_block (for a piece of a longer answer).
        highlight=False leaves code uncolored (much cheaper: for a block still streaming in)."""
        self._blocks = []
        self._first = first_block
        self._highlight = highlight
        body = self.md.render(text).rstrip("\n")  # Qt shows a trailing newline as a space
        return Rendered(body, self._blocks)

    def _fence(self, tokens, idx, options, env) -> str:
        token = tokens[idx]
        code = token.content
        lang = token.info.strip().split(" ")[0] if token.info else ""
        n = self._first + len(self._blocks)
        self._blocks.append(code)
        c = self.colors
        label = html.escape(lang) if lang else "code"
        if self._highlight and code.count("\n") <= HIGHLIGHT_MAX_LINES:
            body = highlight(code, _lexer(lang), self._formatter).rstrip("\n")
        else:
            body = html.escape(code.rstrip("\n"))
        return (f'<table width="100%" cellspacing="0" cellpadding="6" bgcolor="{c.code_bg}" '
                f'style="border: 1px solid {c.code_border}; margin-top: 4px; margin-bottom: 4px;">'
                f'<tr><td><span style="color: {c.muted}; font-size: small;">{label}</span>'
                f'&nbsp;&nbsp;<a href="{COPY_SCHEME}:{n}" style="color: {c.link}; font-size: small;">Copy</a></td></tr>'
                f'<tr><td><pre style="white-space: pre-wrap; margin: 0;">{body}</pre></td></tr></table>\n')

    def _code_inline(self, tokens, idx, options, env) -> str:
        return (f'<code style="background-color: {self.colors.code_bg};">'
                f'{html.escape(tokens[idx].content)}</code>')


def _lexer(lang: str):
    """The lexer the fence names; plain text when it names none (guessing is slow, and it runs on
    every repaint of a streaming answer)."""
    try:
        return get_lexer_by_name(lang) if lang else TextLexer()
    except ClassNotFound:
        return TextLexer()


@dataclass(frozen=True)
class Cut:
    """A place in a streaming answer before which the text is finished (see stable_cuts)."""

    end: int  # characters that will not change how they render
    list_item: bool  # the text from `end` on is the next item of the list that ends there


# A list item's marker at the start of a line: "- ", "* ", "+ ", "1. ", "1) ".
_LIST_ITEM = re.compile(r"([-*+]|[0-9]{1,9}[.)])[ \t]")
# Lines at column 0 that end a list when no blank line comes first (with fences: a heading, a quote).
_LIST_BREAKERS = ("#", ">")


def _list_marker(line: str) -> str | None:
    """The list kind a line starts ("-", "*", "+", "." or ")"), None if it starts no list item."""
    m = _LIST_ITEM.match(line)
    if m is None:
        return None
    marker = m.group(1)
    return marker if marker in "-*+" else marker[-1]


def stable_cuts(text: str) -> list[Cut]:
    """Where the finished blocks of a streaming answer end, in order. Text before a cut will not
    change how it renders, so only what follows the last cut is re-rendered on each update. A cut
    follows each blank line outside a code fence; inside a list with no blank lines (a "tight" list,
    where a long answer can spend thousands of tokens) there is also one before each item."""
    cuts = []
    pos, fence, run_list, first_of_run = 0, False, None, True  # run_list: the run's list kind
    for line in text.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fence, run_list = not fence, None
        elif fence:
            continue
        elif not stripped:
            if line.endswith("\n") and pos < len(text):
                cuts.append(Cut(pos, False))
            first_of_run, run_list = True, None
            continue
        elif first_of_run:
            run_list = _list_marker(line)
        elif run_list is not None:
            marker = _list_marker(line)
            if marker == run_list:
                cuts.append(Cut(start, True))
            elif marker is not None:
                run_list = marker  # another kind of marker starts another list
            elif line.startswith(_LIST_BREAKERS):
                run_list = None
        first_of_run = False
    return cuts


def plain_html(text: str) -> str:
    """Plain text (the thinking, a user's message) as HTML that keeps its line breaks."""
    return html.escape(text).replace("\n", "<br>")
