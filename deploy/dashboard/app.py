"""The dashboard's web app (Starlette + Jinja2 templates), its security headers, and ``serve``.

Pages and their JSON twins under ``/api/``: runs (``/``, ``/api/runs``), one run
(``/runs/<name>``, ``/api/runs/<name>``), sites (``/sites``, ``/api/sites``) and the ledger
(``/ledger``, ``/api/ledger``). Every one needs the token (:mod:`deploy.dashboard.access`);
only the login form and the package's own CSS/JS are served without it. A run is looked up by
its folder name among the folders the runs folder lists, so no URL reaches a file outside it,
and no file of a run is ever served: pages are rendered from the run's JSON files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common.errors import ConfigError
from common.log import get_logger
from deploy.dashboard import runs as run_files
from deploy.dashboard.access import COOKIE, Access
from deploy.dashboard.charts import learning_curves_svg
from deploy.dashboard.ledger_view import ledger_view, read_ledger, sites_view

__all__ = ["DashboardConfig", "create_app", "serve"]

log = get_logger("deploy.dashboard")

_HERE = Path(__file__).parent
#: Content security policy: the package's own scripts, styles and images, nothing remote.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_PUBLIC = ("/login", "/static/")


@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard shows and who may see it.

    Attributes
    ----------
    runs_dir : Path
        Folder of run folders (``--runs``).
    token : str
        The bearer token.
    ledger : Path | None (default: None)
        The coordinator's run ledger (``--ledger``).
    release_key : Path | None (default: None)
        Public key releases are verified against (the coordinator kit's, when started by
        ``qanafed coord start --dashboard``, or ``QANAFED_RELEASE_KEY``); None: the check's
        default (a simulation's own key beside its run folder).
    poll_seconds : float (default: 5.0)
        Seconds between the browser's checks for new data.
    """

    runs_dir: Path
    token: str
    ledger: Path | None = None
    release_key: Path | None = None
    poll_seconds: float = 5.0


def _templates() -> Any:
    from jinja2 import ChainableUndefined, Environment, FileSystemLoader

    # Reports differ between versions: a missing field renders as "–", never as an error.
    env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True,
                      undefined=ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["age"] = run_files.age
    env.filters["when"] = _when
    env.filters["plain"] = _plain
    return env


def _plain(value: Any) -> str:
    """Render a policy value: lists joined, mappings as ``key: value``, booleans as yes/no."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value) or "none"
    return _num(value)


def _num(value: Any, digits: int = 3) -> str:
    from jinja2 import Undefined

    if value is None or isinstance(value, Undefined):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _when(timestamp: float | None) -> str:
    import datetime as dt

    if timestamp is None:
        return "–"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Guard(BaseHTTPMiddleware):
    """Refuse requests without the token (401) and put the security headers on every answer."""

    def __init__(self, app: Any, access: Access, render: Any, on_error: Any) -> None:
        super().__init__(app)
        self.access = access
        self.render = render
        self.on_error = on_error

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        allowed = path.startswith(_PUBLIC) or self.access.bearer_ok(
            request.headers.get("authorization")) or self.access.cookie_ok(
            request.cookies.get(COOKIE))
        if allowed:
            try:
                response = await call_next(request)
            except Exception as exc:  # answered here so that it gets the headers below
                response = await self.on_error(request, exc)
        elif path.startswith("/api/"):
            response = JSONResponse({"error": "a valid bearer token is required"}, 401,
                                    headers={"WWW-Authenticate": 'Bearer realm="qanafed"'})
        else:
            response = self.render(request, "login.html", {"next": path, "wrong": False}, 401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="qanafed"'
        for key, value in _HEADERS.items():
            response.headers.setdefault(key, value)
        response.headers.setdefault("Content-Security-Policy", CSP)
        return response


def create_app(config: DashboardConfig) -> Starlette:
    """Build the dashboard app for ``config`` (serve it with uvicorn, or :func:`serve`)."""
    env = _templates()
    access = Access(config.token)
    runs_dir = config.runs_dir

    def render(request: Request, name: str, context: dict[str, Any], status: int = 200,
               poll: str | None = None, version: str = "") -> Response:
        html = env.get_template(name).render(
            request=request, poll=poll, version=version, poll_ms=int(config.poll_seconds * 1000),
            nav=name.split(".")[0], **context)
        return Response(html, status, media_type="text/html; charset=utf-8")

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def the_run(request: Request) -> Path:
        run_dir = run_files.find_run(runs_dir, request.path_params["name"])
        if run_dir is None:
            raise HTTPException(404, "no such run")
        return run_dir

    def views() -> list[dict[str, Any]]:
        return [run_files.run_view(runs_dir / n, check_release=False)
                for n in run_files.list_runs(runs_dir)]

    def folders_by_run_id(vs: list[dict[str, Any]]) -> dict[str, str]:
        found: dict[str, str] = {}
        for v in vs:  # a run folder copied elsewhere keeps its id: link the first
            if v.get("run_id"):
                found.setdefault(str(v["run_id"]), v["name"])
        return found

    def all_version() -> str:
        parts = [f"{n}={run_files.version(runs_dir / n)}" for n in run_files.list_runs(runs_dir)]
        if config.ledger is not None:
            for p in (config.ledger, config.ledger.with_name(config.ledger.name + "-wal")):
                try:
                    st = p.stat()
                    parts.append(f"{p.name}={st.st_mtime_ns}:{st.st_size}")
                except OSError:
                    parts.append(f"{p.name}=-")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------ pages
    async def login_form(request: Request) -> Response:
        nxt = request.query_params.get("next", "/")
        return render(request, "login.html", {"next": nxt, "wrong": False})

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body())[:4096].decode("utf-8", errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        nxt = (form.get("next") or ["/"])[0]
        if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
            nxt = "/"
        if not access.token_ok(token):
            return render(request, "login.html", {"next": nxt, "wrong": True}, 401)
        response = RedirectResponse(nxt, 303)
        response.set_cookie(COOKIE, access.session(), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    def runs_page(request: Request) -> Response:
        vs = views()
        lv = ledger_view(config.ledger, folders_by_run_id(vs)) if config.ledger else None
        return render(request, "runs.html", {
            "runs": [run_files.run_summary(v) for v in vs],
            "ledger": lv, "runs_dir": str(runs_dir)}, poll="/api/version",
            version=all_version())

    def run_page(request: Request) -> Response:
        run_dir = the_run(request)
        view = run_files.run_view(run_dir, config.release_key)
        has_curves = any(r["phase"] in ("warmup", "qat") and r["global"].get(
            "balanced_accuracy") is not None for r in view.get("rounds") or [])
        return render(request, "run.html", {"run": view, "has_curves": has_curves},
                      poll=f"/api/runs/{view['name']}", version=view["version"])

    def curves(request: Request) -> Response:
        run_dir = the_run(request)
        view = run_files.run_view(run_dir, check_release=False)
        svg = learning_curves_svg(view.get("rounds") or [], (view["name"], view["version"]))
        if svg is None:
            raise HTTPException(404, "no scored rounds yet")
        return Response(svg, media_type="image/svg+xml",
                        headers={"Content-Security-Policy": _SVG_CSP})

    def sites_page(request: Request) -> Response:
        ledger = read_ledger(config.ledger) if config.ledger else None
        sites = sites_view(ledger or {}, [v for v in views() if v["kind"] == "federated"])
        return render(request, "sites.html", {"sites": sites, "ledger": ledger},
                      poll="/api/version", version=all_version())

    def ledger_page(request: Request) -> Response:
        lv = ledger_view(config.ledger, folders_by_run_id(views())) if config.ledger else None
        return render(request, "ledger.html", {"ledger": lv}, poll="/api/version",
                      version=all_version())

    # -------------------------------------------------------------------------------- api
    def api_runs(request: Request) -> Response:
        vs = views()
        return JSONResponse({
            "runs": [run_files.run_summary(v) for v in vs],
            "ledger_runs": (ledger_view(config.ledger, folders_by_run_id(vs))["runs"]
                            if config.ledger else []),
        })

    def api_run(request: Request) -> Response:
        return JSONResponse(run_files.run_view(the_run(request), config.release_key))

    def api_sites(request: Request) -> Response:
        ledger = read_ledger(config.ledger) if config.ledger else {}
        return JSONResponse({"sites": sites_view(ledger, [
            v for v in views() if v["kind"] == "federated"])})

    def api_ledger(request: Request) -> Response:
        if config.ledger is None:
            return JSONResponse({"path": None, "problem": "no ledger given (--ledger)"})
        return JSONResponse(ledger_view(config.ledger, folders_by_run_id(views())))

    def api_version(request: Request) -> Response:
        return JSONResponse({"version": all_version()})

    # ----------------------------------------------------------------------------- errors
    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "error") if status < 500 else "internal error"
        if wants_json(request):
            return JSONResponse({"error": detail}, status)
        return render(request, "error.html", {"status": status, "detail": detail}, status)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("dashboard: %s on %s: %s", type(exc).__name__, request.url.path, exc)
        if wants_json(request):
            return JSONResponse({"error": "internal error"}, 500)
        return render(request, "error.html", {"status": 500, "detail": "internal error: see "
                                              "the dashboard's log"}, 500)

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", runs_page),
        Route("/runs/{name}", run_page),
        Route("/runs/{name}/curves.svg", curves),
        Route("/sites", sites_page),
        Route("/ledger", ledger_page),
        Route("/api/runs", api_runs),
        Route("/api/runs/{name}", api_run),
        Route("/api/sites", api_sites),
        Route("/api/ledger", api_ledger),
        Route("/api/version", api_version),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_Guard, access=access, render=render, on_error=server_error)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


def check_runs_dir(runs_dir: Path) -> Path:
    """Return ``runs_dir`` resolved, or raise :class:`ConfigError` when it is not a folder."""
    if not runs_dir.is_dir():
        what = "is a file, not a folder" if runs_dir.exists() else "does not exist"
        raise ConfigError(f"runs folder {runs_dir} {what}",
                          "pass the folder that holds run folders (e.g. runs/, or "
                          "<coordinator kit>/run/runs)")
    return runs_dir.resolve()


def serve(config: DashboardConfig, host: str = "127.0.0.1", port: int = 8800) -> None:
    """Serve the dashboard with uvicorn until interrupted."""
    import uvicorn

    from deploy.process import port_in_use

    if port_in_use(host, port):
        raise ConfigError(f"port {port} on {host} (the dashboard's --port) is already in use",
                          "pass another --port, or stop what listens there")
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning",
                server_header=False, proxy_headers=False, access_log=False)
