"""An expected failure of a command (a port in use, a server that refuses, a file that is missing): the command
line prints it as one line, without a traceback, and exits with its status."""

from __future__ import annotations

import os
import ssl

# Exit statuses shared by the commands.
FAILED = 1  # the command ran and what it checks failed (a turn errored, a soak lost turns, outcomes differ)
UNUSABLE = 2  # the command could not do its work (bad argument, unreachable server, unreadable file); as argparse


class ToolError(Exception):
    """One line for the user; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = UNUSABLE) -> None:
        super().__init__(message)
        self.status = status


def describe(error: OSError) -> str:
    """An OSError as a person reads it: 'connection refused', not '[Errno 111] Connection refused'."""
    if error.errno and error.errno > 0 and not isinstance(error, ssl.SSLError):
        text = os.strerror(error.errno)  # asyncio's bind errors wrap it in a sentence of their own
    else:  # a name not found (negative errno), TLS, a timeout
        text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]
