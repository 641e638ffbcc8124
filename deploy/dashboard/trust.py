"""Adapter to the trust checks (issue 16): release signatures, ledger audit, DP ε per site.

Those checks live in ``common.release`` (``verify_release``), ``deploy.ledger``
(``audit_ledger``, ``LedgerAudit``) and the report's ``privacy`` block; this module is the
dashboard's only contact with them. Where this version of qanafed does not have them yet,
each panel says "not available" instead of failing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import QanafedError
from common.log import get_logger

__all__ = ["ledger_audit", "privacy", "release_status"]

log = get_logger("deploy.dashboard")

#: Suffix of a release manifest beside its model (``<model>.release.json``).
RELEASE_SUFFIX = ".release.json"
_NOT_AVAILABLE = "not available in this version of qanafed"


def _scalars(manifest: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return the manifest's fields flat (``model.sha256``), lists joined, signatures left out."""
    out: dict[str, Any] = {}
    for key, value in manifest.items():
        name = f"{prefix}{key}"
        if "signature" in str(key).lower():
            continue
        if isinstance(value, Mapping) and not prefix:
            out.update(_scalars(value, f"{name}."))
        elif isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            out[name] = ", ".join(str(v) for v in value)
        elif isinstance(value, str | int | float | bool) or value is None:
            out[name] = value
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


def release_status(model: Path, public_key: Path | None = None) -> dict[str, Any] | None:
    """Whether ``model``'s release manifest is present, and valid for its hash and signature.

    Returns
    -------
    dict[str, Any] | None
        None without a model; else ``available`` (False when this qanafed cannot verify
        releases), ``verified``, ``problem`` and ``manifest`` (its fields, no signature).
    """
    if not model.is_file():
        return None
    manifest_file = model.with_name(model.name + RELEASE_SUFFIX)
    try:
        from common.release import verify_release  # type: ignore[import-not-found]
    except ImportError:
        return {"available": False, "verified": None, "problem": f"release check {_NOT_AVAILABLE}",
                "manifest": None}
    if not manifest_file.is_file():
        return {"available": True, "verified": False,
                "problem": f"no release manifest ({manifest_file.name})", "manifest": None}
    try:
        manifest = verify_release(model, public_key)
    except QanafedError as err:
        return {"available": True, "verified": False, "problem": err.problem, "manifest": None}
    except Exception as err:  # a damaged manifest must not take the page down
        log.warning("release check of %s failed: %s", model, err)
        return {"available": True, "verified": False,
                "problem": f"release check failed ({type(err).__name__})", "manifest": None}
    return {"available": True, "verified": True, "problem": None,
            "manifest": _scalars(manifest if isinstance(manifest, Mapping) else {})}


def ledger_audit(ledger: Path) -> dict[str, Any]:
    """Audit the ledger's hash chain.

    Returns
    -------
    dict[str, Any]
        ``available``, ``ok``, ``entries``, ``first_broken`` and ``reason`` (why not ok).
    """
    try:
        from deploy.ledger import audit_ledger  # type: ignore[attr-defined]
    except ImportError:
        return {"available": False, "ok": None, "entries": None, "first_broken": None,
                "reason": f"ledger audit {_NOT_AVAILABLE}"}
    try:
        audit = audit_ledger(ledger)
    except QanafedError as err:
        return {"available": True, "ok": False, "entries": None, "first_broken": None,
                "reason": err.problem}
    except Exception as err:  # a corrupted file must give a verdict, not a traceback
        log.warning("ledger audit of %s failed: %s", ledger, err)
        return {"available": True, "ok": False, "entries": None, "first_broken": None,
                "reason": f"audit failed ({type(err).__name__}: {err})"}
    return {"available": True, "ok": bool(audit.ok), "entries": audit.entries,
            "first_broken": audit.first_broken, "reason": audit.reason}


def privacy(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """Privacy spent per site from the report's ``privacy`` block, or None when not reported.

    Returns
    -------
    dict[str, Any] | None
        ``enabled``, ``clip``, ``noise_multiplier``, ``delta``, ``accountant`` and ``sites``:
        site id → ``{"rounds", "epsilon", "delta"}`` (``epsilon`` None without DP: unbounded).
    """
    block = report.get("privacy")
    if not isinstance(block, Mapping) or not isinstance(block.get("sites"), Mapping):
        return None
    sites = {str(site): {k: s.get(k) for k in ("rounds", "epsilon", "delta")}
             for site, s in sorted(block["sites"].items()) if isinstance(s, Mapping)}
    return {"enabled": bool(block.get("enabled")), "sites": sites,
            **{k: block.get(k) for k in ("clip", "noise_multiplier", "delta", "accountant")}}
