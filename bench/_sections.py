"""Benchmark docs made of marked sections: each bench rewrites its own ``<!-- name -->`` part."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, lines: list[str], start: str, end: str, title: str, before: str = "") -> None:
    """Replace the ``start`` .. ``end`` section of ``doc`` with ``lines`` (which carry both markers).

    A missing section is appended, or put in front of the text ``before`` when the doc has it;
    a missing doc starts with ``title``.
    """
    text = doc.read_text() if doc.is_file() else f"{title}\n\n"
    if start in text and end in text:
        text = text[:text.index(start)] + "\n".join(lines) + text[text.index(end) + len(end):]
    else:
        at = text.index(before) if before and before in text else len(text)
        text = text[:at].rstrip("\n") + "\n\n" + "\n".join(lines) + "\n" + text[at:]
    doc.write_text(text)
    print(f"wrote {doc}")
