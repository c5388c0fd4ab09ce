"""The docs read on GitHub: every relative link in README.md and docs/ resolves to a file, and
every #anchor to a heading of the page it names (GitHub's slugs)."""

import re
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    body = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(line.lstrip("#")) for line in body.splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path):
    body = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for match in LINK.finditer(body):
        target = match.group(1) or match.group(2)
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked (no network)
            yield target


def test_slug_matches_github():
    assert slug("The teacher's learning rate, chosen on validation (2026-12-01)") == "the-teachers-learning-rate-chosen-on-validation-2026-12-01"
    assert slug("`dkd` and `crd` rows") == "dkd-and-crd-rows"


def test_there_are_pages_and_links():
    assert len(PAGES) > 5 and sum(1 for page in PAGES for _ in links(page)) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    assert not broken, broken
