"""The component's exports: the module build.sh hands componentize-py.

Not for plugin authors. It imports the plugin's ``app`` module (which calls
:func:`wasmgate.export`) at build time, so a plugin that fails to import or
never exports a handler fails the build, and defines the classes
componentize-py binds to the ``handler`` and ``resume`` interfaces of the
``resumable-plugin`` world. Each call is passed on with its connection id;
nothing here remembers a "current" connection.
"""

import importlib

import wasmgate
from wit_world import exports

importlib.import_module("app")
wasmgate._exported()  # raises (failing the build) if app.py did not export a handler


class Handler(exports.Handler):
    """``wasmgate:plugin/handler``."""

    def on_open(self, conn, req):  # type: ignore[no-untyped-def]
        return wasmgate._dispatch_open(conn, req)

    def on_message(self, conn, msg):  # type: ignore[no-untyped-def]
        wasmgate._dispatch_message(conn, msg)

    def on_fragment(self, conn, fragment):  # type: ignore[no-untyped-def]
        wasmgate._dispatch_fragment(conn, fragment)

    def on_close(self, conn, code, reason):  # type: ignore[no-untyped-def]
        wasmgate._dispatch_close(conn, code, reason)

    def on_timer(self, conn, timer):  # type: ignore[no-untyped-def]
        wasmgate._dispatch_timer(conn, timer)


class Resume(exports.Resume):
    """``wasmgate:plugin/resume`` (0.1.1)."""

    def on_resume(self, conn, req):  # type: ignore[no-untyped-def]
        wasmgate._dispatch_resume(conn, req)
