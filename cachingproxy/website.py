"""Pure: S3 website hosting features per site: object redirects and folder listings."""

from __future__ import annotations

import email.utils
import html
from collections.abc import Sequence
from urllib.parse import quote

__all__ = ["listing_page", "redirect_target"]


def redirect_target(mount: str, value: str) -> str | None:
    """Where an object's `x-amz-website-redirect-location` sends the reader, as S3 website hosting does: a path
    within the site (the mount prepended), or a full http(s) URL as is; None for anything else."""
    if value.startswith("/") and not value.startswith("//"):
        return mount + value
    if value.lower().startswith(("http://", "https://")) and len(value) > len("https://"):
        return value
    return None


def listing_page(title: str, folders: Sequence[str], objects: Sequence[tuple[str, int, float | None]],
                 truncated: bool) -> bytes:
    """An HTML listing of one folder: sub-folders (names ending in "/") and objects (name, size, modified).

    Every name is HTML-escaped and every link relative and percent-encoded, so a key such as
    `<script>alert(1)</script>.html` shows as text and links to itself.
    """
    rows = ['<tr><td><a href="../">../</a></td><td></td><td></td></tr>']
    for name in folders:
        rows.append(f'<tr><td><a href="{_href(name)}">{html.escape(name)}</a></td><td>-</td><td></td></tr>')
    for name, size, modified in objects:
        when = email.utils.formatdate(modified, usegmt=True) if modified is not None else ""
        rows.append(f'<tr><td><a href="{_href(name)}">{html.escape(name)}</a></td>'
                    f'<td class="n">{size:,}</td><td>{html.escape(when)}</td></tr>')
    more = "<p>Only the first part of this folder is listed.</p>" if truncated else ""
    title = html.escape(title)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Index of {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}td{{padding:.2rem 1rem .2rem 0}}
.n{{text-align:right}}</style>
</head><body><h1>Index of {title}</h1>
<table><thead><tr><th>Name</th><th>Size</th><th>Last modified</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>{more}</body></html>
"""
    return page.encode("utf-8")


def _href(name: str) -> str:
    """A relative link to `name` in this folder: "./" first, so a name with a ':' is never read as a scheme."""
    return "./" + quote(name, safe="/")
