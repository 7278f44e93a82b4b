"""Access to the bindings componentize-py generates from ``wit/plugin.wit``.

The ``wit_world`` package exists only inside a component build
(``componentize-py`` generates it). Outside one (an editor, unit tests on
CPython) ``wasmgate`` still imports, and host calls raise RuntimeError
unless a stand-in was installed with :func:`install`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Optional, Type

_host: Optional[ModuleType]
_types: Optional[ModuleType]
_err: Optional[Type[BaseException]]

try:
    from componentize_py_types import Err as _err  # type: ignore[no-redef]
    from wit_world.imports import host as _host  # type: ignore[no-redef]
    from wit_world.imports import types as _types  # type: ignore[no-redef]
except ImportError:
    _host = _types = _err = None

_MISSING = (
    "the wasmgate host is only available inside a plugin built with "
    "sdk/python/build.sh (no wit_world bindings here)"
)


def install(host: ModuleType, types: ModuleType, err: Type[BaseException]) -> None:
    """Replaces the bindings: ``host`` with the functions of the WIT ``host``
    interface, ``types`` with its types (as componentize-py names them) and
    ``err`` the exception class carrying a failed result's value in
    ``.value``. For testing plugins outside a component."""
    global _host, _types, _err
    _host, _types, _err = host, types, err


def host() -> Any:
    """The ``wasmgate:plugin/host`` functions."""
    if _host is None:
        raise RuntimeError(_MISSING)
    return _host


def wit() -> Any:
    """The ``wasmgate:plugin/types`` types."""
    if _types is None:
        raise RuntimeError(_MISSING)
    return _types


def Err() -> Type[BaseException]:
    """The exception a failed ``result`` is raised as."""
    if _err is None:
        raise RuntimeError(_MISSING)
    return _err
