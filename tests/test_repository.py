"""The project stands alone: its files point only inside the repository.

Every tracked file outside tests/ is free of references to the team's shared notes outside the
repository; every relative link of a tracked Markdown file names a file of the repository; and every
"docs/design.md §N" reference names a section that docs/design.md has.
"""
from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTSIDE = tuple(s.encode() for s in ("../shared", "shared/DESIGN", "DESIGN.md", "DESIGN §"))


def tracked_files() -> list[pathlib.Path]:
    """The files git tracks (a fresh clone's files)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def test_no_file_outside_tests_points_outside_the_repository():
    files = [f for f in tracked_files() if f.relative_to(ROOT).parts[0] != "tests"]
    assert any(f.name == "README.md" for f in files)
    offenders = [f"{f.relative_to(ROOT)}: {s.decode()}" for f in files for s in OUTSIDE if s in f.read_bytes()]
    assert not offenders, offenders


def test_markdown_links_name_files_of_the_repository():
    checked = 0
    for md in (f for f in tracked_files() if f.suffix == ".md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor of the same page
            path = (md.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{md.relative_to(ROOT)} links to {target}"
            checked += 1
    assert checked


def test_design_references_name_sections_of_docs_design():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\.", design, flags=re.M))
    references = [(f.relative_to(ROOT), n) for f in tracked_files() if f.suffix in (".py", ".md")
                  for n in re.findall(r"docs/design\.md §(\d+)", f.read_text(encoding="utf-8"))]
    assert references and {"1", "2", "3", "4"} <= sections
    assert all(n in sections for _, n in references), [r for r in references if r[1] not in sections]
