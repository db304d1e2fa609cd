"""The dashboard: static files served from memory by the daemon itself (no build step, no
internet). The page logs in with the admin key (kept in ``sessionStorage``) and polls
``GET /api/stats`` with it as a Bearer token; the files themselves are public. The Keys page
(``keys.html``) lists, creates and revokes client keys and teams through the admin API
(``/admin/keys``, ``/admin/teams``) with the same key, and shows spend against budget.

``static/uPlot.*`` is uPlot (MIT licence, ``static/uPlot.LICENSE``), copied from npm's ``uplot``.
"""

from __future__ import annotations

from importlib.resources import files

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".LICENSE": b"text/plain; charset=utf-8",
}
ASSET_NAMES = (
    "index.html",
    "dashboard.js",
    "keys.html",
    "keys.js",
    "dashboard.css",
    "uPlot.iife.min.js",
    "uPlot.min.css",
    "uPlot.LICENSE",
)
# No inline script or style, no third-party origin: the page only talks to this daemon.
SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


def load_assets() -> dict[str, tuple[bytes, bytes]]:
    """Every file of the dashboard as ``name: (content type, bytes)``, read once at start."""
    folder = files(__package__) / "static"
    assets = {}
    for name in ASSET_NAMES:
        suffix = name[name.rindex(".") :]
        assets[name] = (CONTENT_TYPES[suffix], (folder / name).read_bytes())
    return assets
