"""The documentation site builds with no warning (mkdocs --strict) and covers every method."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from torchslim.core import list_methods

ROOT = Path(__file__).resolve().parents[1]


def test_docs_site_builds_strictly_with_a_page_per_method(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr
    for key in list_methods():
        page = tmp_path / "site" / "methods" / key / "index.html"
        assert page.is_file(), f"no documentation page for {key}"
        assert f"method: {key}" in page.read_text(encoding="utf-8")
    assert (tmp_path / "site" / "choosing" / "index.html").is_file()
