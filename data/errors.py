"""The one base of the errors a user can act on.

Every error that names a file or setting and its fix derives from :class:`CxrError`, so the
command line catches one class (exit 2, the message without a traceback) and Python callers can
too. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class CxrError(Exception):
    """An input, setting, model or environment problem; ``str()`` names what and how to fix it."""


class UsageError(CxrError):
    """A bad argument value or an unusable combination of arguments (exit 2 on the command line)."""
