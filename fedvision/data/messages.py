"""Turning third-party exception text into the one-line reasons that ``DataError`` messages carry."""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 200) -> str:
    """The exception's message on one line (Pillow and pydicom messages may span several), truncated."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
