"""The README is the front door and the docs hold together: size, links, settings listed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.settings import ENV

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 12_000, len(text.encode())
    for needle in ("make demo", "make test", "docs/operations.md", "docs/configuration.md"):
        assert needle in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target} (no such file)"
        if anchor and dest.suffix == ".md":
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            assert anchor in anchors, f"{page.name}: link to {target} (no such heading in {dest.name})"


def test_configuration_lists_every_setting() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in ENV.values() if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"
