"""The documentation stands alone: every relative link in README.md and docs/ points to a file of
the repository (and, with a #fragment, to a heading of that file), and no page cites a path
outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"```.*?```", re.S)
OUTSIDE = re.compile(r"\.\./shared|/work/")  # the development machine's folders beside the repository


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # skip http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(ROOT), f"{page.name}: link {target} leaves the repository"
        assert dest.exists(), f"{page.name}: link {target} points to a missing file"
        if fragment and dest.suffix == ".md":
            assert fragment in anchors(dest), f"{page.name}: link {target}: no heading #{fragment}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_paths_outside_the_repository(page):
    found = OUTSIDE.search(page.read_text(encoding="utf-8"))
    assert found is None, f"{page.name} cites {found.group()}"


def test_slug():
    assert slug("Measuring on a shared VM") == "measuring-on-a-shared-vm"
    assert slug("Weights format & recipe") == "weights-format--recipe"
