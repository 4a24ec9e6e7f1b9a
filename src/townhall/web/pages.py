"""The web pages: small HTML shells, one per page, filled in by a JavaScript module each.

The node serves everything a browser needs: the pages, ``/static/`` (our modules and CSS, part
of the Python package) and ``/vendor/hls.mjs`` (hls.js, installed from the npm registry by
``npm ci`` into the repository's ``node_modules``; see ``package-lock.json``). Nothing is loaded
from a third-party host. A wheel install carries no ``node_modules`` (point the
``web_node_modules`` setting at one): the pages that play audio then answer with a page saying
how to install it, rather than failing in the browser.

The pages hold no state of their own. They call the public JSON API with the bearer token kept
in the browser's ``localStorage``, exactly as any other client would.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from townhall.config import Config
from townhall.control.node import Node
from townhall.spaces.reactions import EMOJI

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
# The light build: everything an audio-only LL-HLS player needs (no subtitles, DRM, CMCD).
HLS_BUILD = "hls.js/dist/hls.light.min.mjs"

# The pages' own policy: scripts, styles, media and connections from this origin only (and
# from `public_url` when the node hands out links on another origin, a CDN say). Media also
# plays from blob: URLs (hls.js feeds a MediaSource); WebRTC media needs no directive.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:{extra}; connect-src 'self'{extra}; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def headers(public_url: str = "") -> dict[str, str]:
    parts = urlsplit(public_url)
    extra = f" {parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else ""
    return {
        "Content-Security-Policy": CSP.format(extra=extra),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-cache",
    }


router = APIRouter(include_in_schema=False)

SpaceId = Annotated[str, PathParam(min_length=1, max_length=16, pattern="^[A-Za-z0-9]+$")]
Handle = Annotated[str, PathParam(min_length=1, max_length=15, pattern="^[A-Za-z0-9_]+$")]


def node_modules_roots(configured: str = "") -> list[Path]:
    """Where ``node_modules`` may be: only the configured directory (``web_node_modules``) when
    there is one, else the repository root (a checkout or an editable install:
    ``src/townhall/web`` is three levels below it), then the working directory."""
    if configured:
        return [Path(configured)]
    return [HERE.parents[2] / "node_modules", Path.cwd() / "node_modules"]


def hls_js(configured: str = "") -> Path | None:
    """The hls.js module file, or None when the npm packages are not installed."""
    for root in node_modules_roots(configured):
        candidate = root / HLS_BUILD
        if candidate.is_file():
            return candidate
    return None


def _config(request: Request) -> Config:
    node: Node = request.app.state.node
    return node.config


_SHELL = Template((TEMPLATES / "shell.html").read_text(encoding="utf-8"))
# Every page's fragment, read once: they are package data and change only with the package.
_BODIES = {path.stem: path.read_text(encoding="utf-8") for path in TEMPLATES.glob("*.html")}


def render(request: Request, page: str, title: str, **data: str) -> HTMLResponse:
    """The page ``page``: the shared shell around ``templates/{page}.html``, with ``data`` as
    ``data-*`` attributes of ``<main>`` for the page's module to read."""
    attrs = "".join(f' data-{k.replace("_", "-")}="{html.escape(v)}"' for k, v in data.items())
    text = _SHELL.substitute(title=html.escape(title), page=page, attrs=attrs, body=_BODIES[page])
    return HTMLResponse(text, headers=headers(_config(request).public_url))


def audio_page(request: Request, page: str, title: str, **data: str) -> HTMLResponse:
    """A page that plays audio; when hls.js is not installed (a wheel install, or a checkout
    where ``npm ci`` has not run), a page that says how to install it instead of a broken
    player."""
    configured = _config(request).web_node_modules
    if hls_js(configured) is not None:
        return render(request, page, title, **data)
    roots = ", ".join(str(r) for r in node_modules_roots(configured))
    response = render(request, "missing", "Player not installed", roots=roots)
    response.status_code = 503
    return response


@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> HTMLResponse:
    return render(request, "home", "townhall")


@router.get("/login", response_class=HTMLResponse)
async def login(request: Request) -> HTMLResponse:
    return render(request, "login", "Log in")


@router.get("/signup", response_class=HTMLResponse)
async def signup(request: Request) -> HTMLResponse:
    return render(request, "signup", "Sign up")


@router.get("/spaces/{space_id}", response_class=HTMLResponse)
async def space(request: Request, space_id: SpaceId) -> HTMLResponse:
    return audio_page(request, "space", "Space", space_id=space_id, emoji=" ".join(EMOJI))


@router.get("/spaces/{space_id}/replay", response_class=HTMLResponse)
async def replay(request: Request, space_id: SpaceId) -> HTMLResponse:
    return audio_page(request, "replay", "Replay", space_id=space_id)


@router.get("/@{handle}", response_class=HTMLResponse)
async def account(request: Request, handle: Handle) -> HTMLResponse:
    return render(request, "account", f"@{handle}", handle=handle)


@router.get("/admin", response_class=HTMLResponse)
async def admin(request: Request) -> HTMLResponse:
    return render(request, "admin", "Moderation")


@router.get("/vendor/hls.mjs")
async def vendor_hls(request: Request) -> Response:
    """hls.js from ``node_modules`` (installed by ``npm ci`` from ``package-lock.json``)."""
    path = hls_js(_config(request).web_node_modules)
    if path is None:
        return Response(
            "// hls.js is not installed: run `npm ci` (or `make web`) at the repository root\n",
            status_code=404,
            media_type="text/javascript",
        )
    return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    """Mount the pages and their static files on ``app``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
