"""The documentation: links and images resolve, the nav matches the pages, the site builds
strictly, and the Python examples of the guide and the CLI page run.

Convention for runnable examples: in ``docs/guide.md``, ``docs/cli.md`` and ``docs/index.md`` (and README.md) every fenced
```` ```python ```` block is executed (each in a fresh namespace, in a temporary working
directory) unless the line before it is ``<!-- no-run -->``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))  # with the generated docs/ablations/*.md
RUNNABLE = ["guide.md", "cli.md", "index.md"]

_FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _strip_code(text: str) -> str:
    text = _FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    # Python-Markdown's toc slugify (what mkdocs uses): NFKD, drop non-word chars, hyphens
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    out = set()
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            title = re.sub(r"`([^`]*)`", r"\1", m.group(1))
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
            out.add(_slug(title))
    return out


def _links(path: Path) -> list[str]:
    return _LINK.findall(_strip_code(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    bad = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # external (http:, https:, mailto:)
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            bad.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not bad, f"{page.name}: broken links {bad}"


def test_slug_matches_mkdocs():
    assert _slug("`rl2fx ablate NAME`") == "rl2fx-ablate-name"
    assert _slug("Guide: usage, best practices") == "guide-usage-best-practices"


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for v in item.values():
                out += _nav_files(v) if isinstance(v, list) else [v]
    return out


def test_nav_lists_every_page_and_only_pages():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = [f for f in _nav_files(cfg["nav"]) if not re.match(r"^[a-z]+://", f)]
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    # generated ablation result pages are reached from ablations.md, not the nav
    pages = [p for p in pages if not p.startswith("ablations/")]
    assert sorted(nav) == pages
    assert len(nav) == len(set(nav))


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    cmd = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    r = subprocess.run([*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").exists()


def _python_blocks(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            if prev != "<!-- no-run -->":
                blocks.append((start + 1, "\n".join(lines[start + 1:j])))
            i = j
        i += 1
    return blocks


EXAMPLES = [(name, line, code) for name in RUNNABLE for line, code in _python_blocks(DOCS / name)]
EXAMPLES += [("../README.md", line, code) for line, code in _python_blocks(ROOT / "README.md")]


def test_runnable_pages_have_examples():
    assert {n for n, _, _ in EXAMPLES} == {*RUNNABLE, "../README.md"}


@pytest.mark.parametrize("name, line, code", EXAMPLES, ids=[f"{n}:{ln}" for n, ln, _ in EXAMPLES])
def test_doc_python_example_runs(name, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{name}:{line}", "exec"), {"__name__": "__docs__"})
