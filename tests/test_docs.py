"""The documents live in the repository, and what cites them points at sections that exist."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Built from pieces so that this file does not match itself.
OUTSIDE_POINTERS = ("../" + "shared", "DESIGN" + ".md", "shared" + " folder")

SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache",
                ".ruff_cache", ".hypothesis", ".benchmarks"}


def repository_files() -> list[pathlib.Path]:
    """Tracked and untracked-but-not-ignored files (``git ls-files``), or, outside a git
    checkout, every file except caches, builds and virtual environments."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not (set(p.relative_to(ROOT).parts) & SKIPPED_DIRS)
                and not any(part.endswith(".egg-info") for part in p.parts)]


def text_of(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary (PNG, ...)


def section_names() -> list[str]:
    return [line[3:].strip() for line in ARCHITECTURE.read_text().splitlines()
            if line.startswith("## ")]


def test_the_docs_exist():
    assert ARCHITECTURE.is_file()
    assert (ROOT / "docs" / "README.md").is_file()
    assert {"Layout", "Public API", "One coefficient per token", "Two paths", "Backends",
            "Fused-linear chunking", "KL conventions", "Numerical contract", "Tests",
            "Benchmarks"} <= set(section_names())


def test_nothing_points_outside_the_repository():
    offenders = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(pointer in line for pointer in OUTSIDE_POINTERS):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "point into docs/architecture.md instead:\n" + "\n".join(offenders)


CITATION = re.compile(r"docs/architecture\.md(?:, | \()([A-Z])")


@pytest.mark.parametrize("suffix", [".py", ".md"])
def test_citations_name_existing_sections(suffix):
    """``docs/architecture.md, <Section>`` and ``docs/architecture.md (<Section>)`` name a
    ``##`` heading of the document (line breaks inside the name allowed)."""
    sections = section_names()
    broken = []
    for path in repository_files():
        if path.suffix != suffix or (text := text_of(path)) is None:
            continue
        flat = " ".join(text.replace('"""', " ").split())
        for match in CITATION.finditer(flat):
            rest = flat[match.start(1):]
            if not any(rest.startswith(name) for name in sections):
                broken.append(f"{path.relative_to(ROOT)}: ...{flat[match.start():][:70]}")
    assert not broken, f"sections are {sections}:\n" + "\n".join(broken)


def test_docs_links_resolve():
    for doc in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_architecture_anchors_resolve():
    text = ARCHITECTURE.read_text()
    anchors = {name.lower().replace(" ", "-") for name in section_names()}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"broken anchor #{anchor}"


def test_the_suite_is_deterministic_as_documented():
    """docs/architecture.md, Tests: hypothesis is derandomized without an example database,
    and each test starts from torch's seed 0 (conftest's autouse fixture)."""
    import torch
    from hypothesis import settings

    assert settings.default.derandomize and settings.default.database is None
    assert settings.default.deadline is None
    assert torch.equal(torch.randn(3), torch.randn(3, generator=torch.Generator().manual_seed(0)))
