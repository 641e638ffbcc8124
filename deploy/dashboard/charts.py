"""Learning curves as server-side SVG (matplotlib): no chart JavaScript, nothing fetched."""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ["learning_curves_svg"]

_LOCK = threading.Lock()  # matplotlib's font and text caches are not thread-safe
_CACHE: dict[tuple[str, str], bytes] = {}
_CACHE_SIZE = 32
_PANELS = (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"),
           ("loss", "test loss"))


def learning_curves_svg(rounds: list[Mapping[str, Any]], key: tuple[str, str]) -> bytes | None:
    """Global and per-site test scores per round (warm-up and QAT rounds), as an SVG document.

    Parameters
    ----------
    rounds : list[Mapping[str, Any]]
        The run view's ``rounds`` (:func:`deploy.dashboard.runs.run_view`).
    key : tuple[str, str]
        ``(run name, version)``: the drawing is cached until the run's files change.

    Returns
    -------
    bytes | None
        The SVG, or None when no round has test scores yet.
    """
    scored = [r for r in rounds if r.get("phase") in ("warmup", "qat")
              and r.get("global", {}).get("balanced_accuracy") is not None]
    if not scored:
        return None
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        svg = _draw(scored)
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = svg
        return svg


def _draw(rounds: list[Mapping[str, Any]]) -> bytes:
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4))
    FigureCanvasSVG(fig)
    axes = fig.subplots(1, len(_PANELS))
    steps = [r["step"] for r in rounds]
    sites = sorted({s for r in rounds for s in r.get("sites") or {}})
    qat = [r["step"] for r in rounds if r["phase"] == "qat"]
    for ax, (score, title) in zip(axes, _PANELS, strict=True):
        if qat:
            ax.axvspan(min(qat) - 0.5, max(qat) + 0.5, color="0.92", label="QAT")
        ax.plot(steps, [r["global"].get(score) for r in rounds], "k-o", lw=2, label="global")
        for site in sites:
            ys = [(r.get("sites") or {}).get(site, {}).get(score) for r in rounds]
            ax.plot(steps, [float("nan") if y is None else y for y in ys], "--", marker=".",
                    label=site)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round", fontsize=9)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()
