"""Errors that tell the user what was wrong and how to fix it."""

from __future__ import annotations


class QanafedError(Exception):
    """Base class of every error qanafed raises on purpose.

    Parameters
    ----------
    problem : str
        What is wrong, echoing the received value (file, key, shape ...).
    fix : str | None (default: None)
        What the user can do about it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\nFix: {fix}")


class DataError(QanafedError, ValueError):
    """Input data is missing, malformed or inconsistent."""


class ConfigError(QanafedError, ValueError):
    """A configuration file or option is invalid."""


class ModelError(QanafedError, ValueError):
    """A model cannot be built, quantized, converted or loaded as asked."""


class SecurityError(QanafedError):
    """A key, certificate, signature or ciphertext failed a check."""
