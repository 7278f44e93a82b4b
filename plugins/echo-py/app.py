"""`echo-py`: sends every text and binary message back to its sender.

The Python twin of plugins/echo (Rust). Built by ./dev examples (or
./build.sh in a project made by `wasmgate new --lang python`).
"""

import wasmgate
from wasmgate import Connection, GatewayError, Message, log


class Echo(wasmgate.Handler):
    def on_message(self, conn: Connection, message: Message) -> None:
        try:
            conn.send(message)
        except GatewayError as e:
            log.warn(f"echo to {conn.id} failed: {e}")


wasmgate.export(Echo)
