"""Markdown -> the HTML subset Qt's rich text understands, with highlighted code blocks. No Qt.

Qt's QTextDocument takes HTML 4 with inline styles (no CSS classes, no flexbox), so: pygments
writes inline styles, a code block is a one-cell table (it gets a background and a border), and
its "Copy" link is an anchor `copy:N` that the view maps back to `code_blocks[N]`. Raw HTML in the
model's answer is shown as text, never interpreted.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.util import ClassNotFound

COPY_SCHEME = "copy"


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
        if self._highlight:
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


def stable_end(text: str) -> int:
    """Where the finished blocks of a streaming answer end: after its last blank line outside a
    code fence. Text before it will not change how it renders; only what follows is re-rendered."""
    end, pos, fence = 0, 0, False
    for line in text.splitlines(keepends=True):
        pos += len(line)
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fence = not fence
        elif not stripped and not fence and line.endswith("\n") and pos < len(text):
            end = pos
    return end


def plain_html(text: str) -> str:
    """Plain text (the thinking, a user's message) as HTML that keeps its line breaks."""
    return html.escape(text).replace("\n", "<br>")
