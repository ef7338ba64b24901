"""The README and the pages under docs/: every relative link and every repository path they name exists,
every `#anchor` they link to is a heading of its page, the README stays short, each page links back to it,
and docs/layout.md names every module of src/dpokit. No torch: these read text files only."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

README_MAX_LINES = 260
# a backticked name is checked as a repository path when it starts with one of these (or is one of ROOT_FILES)
PATH_PREFIXES = ("src/", "configs/", "data/", "docs/", "benchmarks/", "tests/")
ROOT_FILES = ("Makefile", "pyproject.toml")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def split_fences(text: str) -> tuple[str, list[str]]:
    """The text with fenced code blocks blanked out (line numbers kept), and the blocks themselves."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return prose, blocks


def links(text: str) -> list[str]:
    prose, _ = split_fences(text)
    prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)  # a link written inside `code` is not a link
    return LINK.findall(prose)


def is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None  # http:, https:, mailto:, ...


def repo_path(candidate: str) -> str | None:
    """The repository path a backticked name or a code token names, or None when it is not one."""
    name = candidate.strip().strip("\"'").rstrip(",;.)")
    if not (name.startswith(PATH_PREFIXES) or name in ROOT_FILES):
        return None
    if any(c in name for c in "*<{") or name.startswith("runs/") or "…" in name or "..." in name:
        return None
    if re.search(r"\s", name):
        return None
    name = re.sub(r"::.*$", "", name)  # tests/x.py::test_name
    name = re.sub(r":\d+(-\d+)?$", "", name)  # file.py:123
    return name


def named_paths(text: str) -> list[str]:
    """Repository paths named in inline code spans and as words of fenced code blocks."""
    prose, blocks = split_fences(text)
    found = [p for m in CODE_SPAN.finditer(prose) if (p := repo_path(m.group(2)))]
    for block in blocks:
        for word in re.split(r"[\s=]+", block):
            if p := repo_path(word):
                found.append(p)
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces → hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](link) → text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_there_are_pages():
    assert README.is_file()
    assert len(PAGES) > 1, "no pages under docs/"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_exist(page: Path):
    missing = []
    for target in links(page.read_text(encoding="utf-8")):
        if is_external(target) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0]
        if not (page.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{rel(page)} links to paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_link_anchors_are_headings(page: Path):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if is_external(target) or "#" not in target:
            continue
        file_part, anchor = target.split("#", 1)
        dest = (page.parent / file_part) if file_part else page
        if dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{rel(page)} links to anchors that are no heading of their page: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_repository_paths_exist(page: Path):
    missing = sorted({p for p in named_paths(page.read_text(encoding="utf-8")) if not (ROOT / p).exists()})
    assert not missing, f"{rel(page)} names repository paths that do not exist: {missing}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES} and move detail to docs/"


@pytest.mark.parametrize("page", [p for p in PAGES if p != README], ids=rel)
def test_pages_start_with_a_link_back_to_the_readme(page: Path):
    first = next(line for line in page.read_text(encoding="utf-8").splitlines() if line.strip())
    target = Path(os.path.relpath(README, page.parent)).as_posix()
    assert f"]({target}" in first, f"{rel(page)} should open with a link to {target}"


def test_layout_names_every_module():
    layout = (DOCS / "layout.md").read_text(encoding="utf-8")
    named = set(named_paths(layout))
    # a subpackage's __init__.py only describes its package, except the command line's, which holds `main`
    described = {"src/dpokit/__init__.py", "src/dpokit/cli/__init__.py"}
    modules = sorted(m for p in (ROOT / "src" / "dpokit").rglob("*.py")
                     if (m := rel(p)) in described or p.name not in ("__init__.py", "__main__.py"))
    missing = [m for m in modules if m not in named]
    assert not missing, f"docs/layout.md does not describe: {missing}"
