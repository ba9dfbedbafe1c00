"""The README stays a short entry page: the two commands first, at most ~12 KB, links that resolve, and a picture
made by code in the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_starts_with_the_two_commands_and_is_small():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12_500, f"README.md is {len(text.encode())} bytes; move detail to docs/"
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("bash run.sh main") and first_block[1].startswith("bash run.sh test")
    assert "sglang serve" in text and "python -m sglang_tpla.launch_server" in text  # both entry points


def test_every_relative_link_in_readme_and_docs_exists():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).resolve().exists():
                missing.append(f"{page.relative_to(REPO)} -> {target}")
    assert not missing, missing


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        if page.name != "README.md":
            assert f"docs/{page.name}" in readme, page.name


def test_layout_picture_is_made_by_code(tmp_path):
    script, png_path = REPO / "docs" / "make_figures.py", tmp_path / "layout.png"
    code = f"import pathlib, runpy; runpy.run_path({str(script)!r})['draw'](pathlib.Path({str(png_path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (REPO / "docs" / "tpla-layout.png").is_file()
