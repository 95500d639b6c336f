"""The README stays a short user's guide, and no link in it or in docs/ points nowhere.

Long tables and the research log live in docs/ (research.md, benchmarks.md); these tests keep
the README from growing back into them and catch links broken by moving or renaming a file or
a heading.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 350
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# The target of an inline link or image: `[text](target)` or `[text](target "title")`; the
# text may span lines (image alt texts do).
LINK_TARGET = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = FENCED_BLOCK.sub("", document.read_text(encoding="utf-8"))
    return {github_anchor(heading) for heading in HEADING.findall(text)}


def relative_links(document: Path) -> list[str]:
    text = FENCED_BLOCK.sub("", document.read_text(encoding="utf-8"))
    return [target for target in LINK_TARGET.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("Run info: timings that are not metrics") == "run-info-timings-that-are-not-metrics"
    assert github_anchor("`metrics/train.json` and `data/train/summary.json`") == "metricstrainjson-and-datatrainsummaryjson"
    assert github_anchor("Your own posts, and SD1.5 on a GPU") == "your-own-posts-and-sd15-on-a-gpu"


def test_readme_is_under_the_line_limit():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines (limit {README_MAX_LINES}): move long tables and research to docs/"
    )


def test_relative_link_finder_sees_links_and_images(tmp_path):
    document = tmp_path / "x.md"
    document.write_text('See [a](docs/a.md#part) and ![an\nimage](img/b.png "t"), not [web](https://x.org)\n'
                        "```\n[inside](code.md)\n```\n")
    assert relative_links(document) == ["docs/a.md#part", "img/b.png"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file(document):
    broken = []
    for target in relative_links(document):
        path_part, _, fragment = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.relative_to(REPO)}")
    assert not broken, f"{document.relative_to(REPO)}: " + "; ".join(broken)
