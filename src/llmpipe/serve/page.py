"""The comparison page at `/`: page.html, shipped in the package (pyproject's package data). It
runs in the browser on the server's own API: the models of `/v1/models` side by side, each
streaming its completion (or chat answer) of the same prompt, scored through `/llmpipe/score`
when done."""

from __future__ import annotations

from importlib import resources

PAGE_FILE = "page.html"


def page_html() -> str:
    """The page's HTML, read from the package at each request."""
    return resources.files("llmpipe.serve").joinpath(PAGE_FILE).read_text()
