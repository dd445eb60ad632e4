"""User-facing error types of the X-NeMo pack.

Why a module of its own: nodes catch these to show a short, actionable message in the ComfyUI
front end instead of a traceback, and every core module raises them without importing each other.
All of them derive from :class:`XNeMoError`; the value-like ones also derive from ``ValueError``
so that generic ``except ValueError`` code keeps working.
"""
from __future__ import annotations

import os


class XNeMoError(Exception):
    """Base class of every error this pack raises on purpose."""


class Cancelled(XNeMoError):
    """The user (or the host, e.g. ComfyUI's interrupt button) asked a long job to stop.

    Raised between work units, so nothing half-written is returned.
    """


class InvalidInputError(XNeMoError, ValueError):
    """An argument has the wrong shape, type, range or value."""


class FileFormatError(XNeMoError, ValueError):
    """A file exists but is not what it should be (wrong container, missing parts, wrong version).

    ``path`` is the offending file; the message always names it.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
