"""The repository explains itself: every document the code and the docs cite is in it.

Pure file reading, no imports of the product: a citation `docs/NAME.md §N` needs docs/NAME.md with a
`## N.` heading; nothing cites the early design document that lived outside the repository; every
relative link of README.md and docs/*.md names a file of the repository; the README stays a page a
user reads first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Build outputs, caches and the virtualenv: not the project's text.
SKIPPED_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", "out", "build",
                "dist", "wheels"}
SUFFIXES = {".py", ".md", ".sh", ".html"}
README_MAX_LINES = 320

# `docs/ARCHITECTURE.md §3`, `ARCHITECTURE.md §4, §5`, `docs/ARCHITECTURE.md §3–5`, `DEPLOY.md §4 and §7`,
# `[CLI.md](CLI.md) §3`.
CITATION = re.compile(r"(?:docs/)?\b([A-Z][A-Z_]*)\.md\)?\s+(§\d+(?:\s*[-–]\s*§?\d+|\s*(?:,|and)\s*§\d+)*)")
SECTION_RUN = re.compile(r"(\d+)\s*[-–]\s*§?(\d+)|(\d+)")
# Written in two parts so that this file does not match itself.
STALE = ("DESIGN" + " §", "../" + "shared", "shared/" + "DESIGN.md")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def project_files() -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        found += [Path(directory, name) for name in files if Path(name).suffix in SUFFIXES or name == "Makefile"]
    return sorted(found)


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def numbered_sections(doc: Path) -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^##\s+(\d+)\.\s", text_of(doc), re.MULTILINE)}


def cited_sections(run: str) -> list[int]:
    """`§3–5` → [3, 4, 5]; `§4, §5` → [4, 5]."""
    numbers = []
    for m in SECTION_RUN.finditer(run):
        if m.group(3):
            numbers.append(int(m.group(3)))
        else:
            low, high = int(m.group(1)), int(m.group(2))
            numbers += list(range(low, high + 1)) if low <= high else [low, high]
    return numbers


def where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def test_every_cited_section_exists():
    sections: dict[str, set[int] | None] = {}
    wrong = []
    for path in project_files():
        text = text_of(path)
        for m in CITATION.finditer(text):
            name = m.group(1)
            if name not in sections:
                doc = ROOT / "docs" / f"{name}.md"
                sections[name] = numbered_sections(doc) if doc.is_file() else None
            have = sections[name]
            if have is None:
                wrong.append(f"{where(path, text, m.start())}: cites docs/{name}.md, which does not exist")
                continue
            for number in cited_sections(m.group(2)):
                if number not in have:
                    wrong.append(f"{where(path, text, m.start())}: cites docs/{name}.md §{number}, which has no "
                                 f"'## {number}.' heading")
    assert not wrong, "\n".join(wrong)


def test_nothing_cites_the_design_outside_the_repository():
    this = Path(__file__).resolve()
    wrong = [f"{where(path, text, text.index(stale))}: {stale!r}"
             for path in project_files() if path.resolve() != this
             for text in [text_of(path)] for stale in STALE if stale in text]
    assert not wrong, "\n".join(wrong)


def test_relative_links_of_the_docs_name_files_of_the_repository():
    wrong = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = text_of(doc)
        prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.MULTILINE | re.DOTALL)
        for m in LINK.finditer(prose):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor in the same page
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                wrong.append(f"{where(doc, prose, m.start())}: links {target}, which is not a file of the repository")
    assert not wrong, "\n".join(wrong)


def test_the_readme_is_a_page_a_user_reads_first():
    readme = text_of(ROOT / "README.md")
    lines = readme.count("\n") + (not readme.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"
    makefile = text_of(ROOT / "Makefile")
    for target in ("demo", "test"):
        assert f"make {target}" in readme, f"README.md does not show `make {target}`"
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"the Makefile has no {target} target"


def test_the_citation_pattern_reads_every_form():
    assert [m.group(1) for m in CITATION.finditer("(docs/ARCHITECTURE.md §3), DEPLOY.md §4")] == ["ARCHITECTURE",
                                                                                                 "DEPLOY"]
    assert cited_sections(CITATION.search("docs/ARCHITECTURE.md §3–5.").group(2)) == [3, 4, 5]
    assert cited_sections(CITATION.search("(docs/ARCHITECTURE.md §4, §5)").group(2)) == [4, 5]
    assert cited_sections(CITATION.search("docs/DEPLOY.md §4 and §7").group(2)) == [4, 7]
    assert cited_sections(CITATION.search("docs/ARCHITECTURE.md §1-§7").group(2)) == list(range(1, 8))
    assert cited_sections(CITATION.search("docs/DEPLOY.md §7, 100 machines").group(2)) == [7]
    assert CITATION.search("[CLI.md](CLI.md) §3").group(1, 2) == ("CLI", "§3")
