"""Writing to the gateway's log, tagged with the route and the plugin.

``from wasmgate import log; log.info("started")``. Each call is one log line
at that level (the gateway's ``RUST_LOG`` filter decides what is written).
``print()`` also works: a plugin's stdout and stderr become log lines.
"""

from __future__ import annotations

from ._host import host as _host
from ._host import wit as _wit

__all__ = ["trace", "debug", "info", "warn", "warning", "error"]


def _log(level: str, message: str) -> None:
    _host().log(getattr(_wit().LogLevel, level), str(message))


def trace(message: str) -> None:
    """Logs at trace level (very detailed tracing)."""
    _log("TRACE", message)


def debug(message: str) -> None:
    """Logs at debug level."""
    _log("DEBUG", message)


def info(message: str) -> None:
    """Logs at info level (normal operation)."""
    _log("INFO", message)


def warn(message: str) -> None:
    """Logs at warn level (something unexpected that the plugin handled)."""
    _log("WARN", message)


#: Same as :func:`warn` (the name Python's ``logging`` uses).
warning = warn


def error(message: str) -> None:
    """Logs at error level (something failed)."""
    _log("ERROR", message)
