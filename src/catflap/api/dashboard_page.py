"""The live view's page, read from ``dashboard.html`` beside this module, and its CSP.

The page is plain HTML with one stylesheet and one small script, both inline. The script asks
for a private key (kept in ``sessionStorage``, so it is gone when the tab closes), then polls
``GET /v1/dashboard/state`` every second and redraws three tables. Each live session has a Stop
button (``DELETE /v1/agents/{agent}/sessions/{id}``). Every value reaches the page through
``textContent``, never as HTML. The Content-Security-Policy allows exactly this script and
stylesheet, by hash, so it is computed here from the file as it is installed.
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE"]

#: Package data (pyproject.toml's ``[tool.setuptools.package-data]``), so wheels carry it.
PAGE_FILE = "dashboard.html"


def _inline(page: str, tag: str) -> str:
    """The text inside the page's one ``<tag>...</tag>``, exactly as the browser hashes it.

    Raises:
        ValueError: the page has no such element, or more than one.
    """
    start, end = f"<{tag}>", f"</{tag}>"
    if page.count(start) != 1 or page.count(end) != 1:
        raise ValueError(f"{PAGE_FILE} must hold exactly one {start}...{end}")
    return page.partition(start)[2].partition(end)[0]


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE = files("catflap.api").joinpath(PAGE_FILE).read_text(encoding="utf-8")

#: Only this page's own script and stylesheet run; it may only call back to the gateway.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src '{_sha256(_inline(PAGE, 'script'))}'; "
    f"style-src '{_sha256(_inline(PAGE, 'style'))}'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
