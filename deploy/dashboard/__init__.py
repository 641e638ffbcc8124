"""The coordinator dashboard: a read-only, token-protected web view of runs, sites and ledger.

``app`` (the Starlette app and ``serve``), ``access`` (the token), ``runs`` and ``ledger_view``
(what the pages show), ``charts`` (SVG learning curves), ``trust`` (release, audit, DP panels).
"""
