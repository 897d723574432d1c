"""Errors a user can cause.

Every stage raises `UserError` for problems the user can fix (a bad file, a bad key, a
missing model, out of memory). The CLI prints them as one message with a hint and exits
with code 2; anything else is a bug in sftlab and keeps its traceback. `BadRow` is not
shown on its own: the data stage collects each as a problem naming its file and line.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class ConfigError(UserError):
    """The config file or a `--set` override is wrong."""


class DataError(UserError):
    """A dataset file is missing, malformed, or cannot be trained on."""


class ModelError(UserError):
    """The model cannot be found or loaded."""


class BadRow(Exception):
    """A row that cannot be used; its message is the reason shown in the audit.

    Here, not in the data package, because the chat-template probes (templates.py), which the
    data stage builds on, raise it too."""
