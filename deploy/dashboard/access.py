"""Who may see the dashboard: one bearer token, sent as ``Authorization: Bearer`` or a cookie.

The token comes from a file (the coordinator kit's ``dashboard.token``, 0600) or is made at start
and printed once. The browser's login form trades it for an HttpOnly, SameSite=Strict cookie whose
value is an HMAC of the token (so the token itself is never stored in the browser); every
comparison is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from common.errors import ConfigError, SecurityError
from common.keyfiles import read_private, write_private

__all__ = ["COOKIE", "TOKEN_FILE", "Access", "load_token", "make_token_file"]

#: The token file in a coordinator kit.
TOKEN_FILE = "dashboard.token"
#: Name of the session cookie the login form sets.
COOKIE = "qanafed_dashboard"
_MIN_LENGTH = 16


def load_token(path: Path | None) -> tuple[str, bool]:
    """Read the token from ``path`` (owner-only file), or make a new one when None.

    Returns
    -------
    tuple[str, bool]
        ``(token, generated)``.

    Raises
    ------
    ConfigError
        The file does not exist, or holds a token shorter than 16 characters.
    SecurityError
        Group or others can read the file.
    """
    if path is None:
        return secrets.token_urlsafe(32), True
    if not path.is_file():
        raise ConfigError(f"token file {path} does not exist",
                          "pass the coordinator kit's dashboard.token (qanafed provision writes "
                          "it), or leave --token-file out to get a new token printed")
    token = read_private(path).decode("utf-8", errors="replace").strip()
    if len(token) < _MIN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(f"token file {path} holds no usable token (one line of at least "
                          f"{_MIN_LENGTH} characters, no spaces)",
                          f"write a new one: python -c 'import secrets; "
                          f"print(secrets.token_urlsafe(32))' > {path}; chmod 600 {path}")
    return token, False


def make_token_file(path: Path) -> bool:
    """Write a new random token to ``path`` (0600) unless one is there; return whether written."""
    if path.exists():
        return False
    write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
    return True


class Access:
    """Checks a request's credentials against the one dashboard token.

    Parameters
    ----------
    token : str
        The bearer token.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise SecurityError("empty dashboard token", "give a token file with a token in it")
        self._token = token.encode()
        self._session = hmac.new(self._token, b"qanafed-dashboard-session",
                                 hashlib.sha256).hexdigest().encode()

    def token_ok(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is the token."""
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._token)

    def bearer_ok(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token as a bearer token."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def cookie_ok(self, value: str | None) -> bool:
        """Whether a session cookie value was made by :meth:`session` for this token."""
        return value is not None and hmac.compare_digest(value.encode(), self._session)

    def session(self) -> str:
        """Return the session cookie value for this token."""
        return self._session.decode()
