"""Reports rendered from a RunRecord: JSON, Markdown and self-contained HTML."""
