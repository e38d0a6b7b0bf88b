"""What the mesh's web pages share: the vendored browser libraries, the consoles' base CSS and
JS helpers (web/page), and a rolling time series.

The libraries (Chart.js, marked, DOMPurify) come from the npm registry through
scripts/vendor_js.sh, pinned by web/package-lock.json, with their licences, into web/vendor/.
Pages load them from their own origin: nothing comes from the internet.
"""

from __future__ import annotations

from pathlib import Path

VENDOR_DIR = Path(__file__).parent / "vendor"
PAGE_DIR = Path(__file__).parent / "page"  # what the consoles share: their base CSS and JS helpers
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".md": "text/plain; charset=utf-8", ".LICENSE": "text/plain; charset=utf-8"}
# Pages load nothing from elsewhere and run no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def content_type(name: str) -> str | None:
    """The type a served file goes out with; None for a kind of file that is never served."""
    suffix = Path(name).suffix
    if suffix not in CONTENT_TYPES and name.endswith("LICENSE"):
        suffix = ".LICENSE"
    return CONTENT_TYPES.get(suffix)


def read_dir(path: Path) -> dict[str, bytes]:
    """The servable files of a folder, read once: requests can then never reach the disk."""
    if not path.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and content_type(p.name)}


def page_files(own: Path) -> dict[str, bytes]:
    """A console's own files over the shared ones of web/page (its own win a name clash)."""
    return {**read_dir(PAGE_DIR), **read_dir(own)}


def vendor_files() -> dict[str, bytes]:
    """The vendored libraries; empty where scripts/vendor_js.sh has not run (pages then say so
    and fall back to plain text)."""
    return read_dir(VENDOR_DIR)
