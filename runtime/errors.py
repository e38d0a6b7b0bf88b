"""The one error type a command shows as a single line (no traceback)."""

from __future__ import annotations


class CliError(Exception):
    """An error to show the user as one line, without a traceback."""
