"""wasmgate: WebSocket handlers for wasmgate, in Python.

A wasmgate plugin is a WebAssembly component that handles the events of one
route: a connection opens, a message arrives, a timer fires, the connection
closes. This package turns the WIT contract (``wit/plugin.wit``, world
``resumable-plugin``) into a small Python API that mirrors the Rust SDK
(``sdk/src/lib.rs``): subclass :class:`Handler` (every method has a default
that does nothing), then call :func:`export` once::

    import wasmgate
    from wasmgate import Connection, OpenResponse, Request, room


    class Chat(wasmgate.Handler):
        def on_open(self, conn: Connection, request: Request) -> OpenResponse:
            name = request.query_param("name") or f"guest-{conn.id}"
            if len(name) > 32:
                return OpenResponse.reject(400, "name too long")
            conn.set_metadata("name", name)
            conn.join("lobby")
            return OpenResponse.accept()

        def on_message(self, conn: Connection, message: str | bytes) -> None:
            if isinstance(message, str):
                name = conn.metadata("name") or ""
                room("lobby").broadcast_json({"from": name, "text": message}, exclude=conn)


    wasmgate.export(Chat)

Build it with ``sdk/python/build.sh PLUGIN_DIR OUT.wasm`` (``PLUGIN_DIR/app.py``
is the module above) and point a route's ``plugin`` at ``OUT.wasm``.

State
-----
The handler object is created once per plugin *instance*. Today the gateway
gives every connection its own instance, but with a shared instance one
handler object serves many connections, so keep per-connection state keyed
by ``conn.id`` (never in a "current connection" global), and drop it in
``on_close``. Anything in Python memory is lost when the instance is
replaced (hibernation, ``on_reload = "migrate"``, a shared instance that
failed): keep what must survive in connection metadata
(:meth:`Connection.set_metadata`) and rebuild from it in ``on_resume``.

Errors
------
Every host call that can fail raises :class:`GatewayError`, whose ``kind``
says why (``"closed"``, ``"backpressure"``...). An exception escaping a
handler does not crash the instance: it is logged at error level with its
traceback and the connection is refused (``on_open``: HTTP 500 ``plugin
failed``) or closed with 1011 ``internal error``, which is what the gateway
does when a Rust plugin panics.

Handlers must not block: a WASI call that would wait (``time.sleep``,
reading a socket) traps. Wait with :meth:`Connection.set_timer` instead.
"""

from __future__ import annotations

import json as _json
import traceback as _traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, List, NamedTuple, Optional, Tuple, Type, Union

from . import log
from ._host import Err as _Err
from ._host import host as _host
from ._host import wit as _wit

__all__ = [
    "Connection",
    "Fragment",
    "GatewayError",
    "Handler",
    "Header",
    "Message",
    "OpenResponse",
    "Request",
    "Room",
    "TimerId",
    "cancel_timer",
    "config",
    "config_all",
    "export",
    "log",
    "room",
]

#: A complete WebSocket message: ``str`` for a text message (always valid
#: UTF-8), ``bytes`` for a binary one. Sending also accepts ``bytearray``
#: and ``memoryview`` as binary.
Message = Union[str, bytes]

#: Identifies a timer started with :meth:`Connection.set_timer`.
TimerId = int

_U32_MAX = 0xFFFF_FFFF


# ---------------------------------------------------------------------------
# Errors


class GatewayError(Exception):
    """A host call failed (the WIT ``gateway-error`` variant).

    ``kind`` is one of the string constants below; ``detail`` is the
    explanation the host gave for ``invalid-argument`` (``None`` for the
    other kinds). Compare ``kind`` with the constants::

        try:
            conn.send_text("hi")
        except GatewayError as e:
            if e.kind == GatewayError.BACKPRESSURE:
                ...
    """

    #: The connection is closing or closed; nothing more can be sent to it.
    CLOSED = "closed"
    #: No open connection with that id exists on this route.
    UNKNOWN_CONNECTION = "unknown-connection"
    #: The message, key, value, reason or name is larger than the limit.
    TOO_LARGE = "too-large"
    #: The connection's outbound buffer is full (a slow consumer): the message
    #: was not queued. The route's ``slow_consumer`` policy says whether the
    #: connection is also being closed.
    BACKPRESSURE = "backpressure"
    #: A per-connection quota (timers, metadata entries, rooms) is used up.
    LIMIT_REACHED = "limit-reached"
    #: Only allowed on connections served by this instance (for example timers).
    NOT_OWNER = "not-owner"
    #: An argument is invalid; ``detail`` says which and why.
    INVALID_ARGUMENT = "invalid-argument"

    kind: str
    detail: Optional[str]

    def __init__(self, kind: str, detail: Optional[str] = None) -> None:
        """Creates the error; ``kind`` is one of the class constants."""
        self.kind = kind
        self.detail = detail
        super().__init__(kind if detail is None else f"{kind}: {detail}")

    def __repr__(self) -> str:
        if self.detail is None:
            return f"GatewayError({self.kind!r})"
        return f"GatewayError({self.kind!r}, {self.detail!r})"


def _kind_of(value: Any) -> GatewayError:
    """Converts the WIT ``gateway-error`` payload of an ``Err`` to a GatewayError."""
    w = _wit()
    table = (
        (w.GatewayError_Closed, GatewayError.CLOSED),
        (w.GatewayError_UnknownConnection, GatewayError.UNKNOWN_CONNECTION),
        (w.GatewayError_TooLarge, GatewayError.TOO_LARGE),
        (w.GatewayError_Backpressure, GatewayError.BACKPRESSURE),
        (w.GatewayError_LimitReached, GatewayError.LIMIT_REACHED),
        (w.GatewayError_NotOwner, GatewayError.NOT_OWNER),
    )
    for cls, kind in table:
        if isinstance(value, cls):
            return GatewayError(kind)
    if isinstance(value, w.GatewayError_InvalidArgument):
        return GatewayError(GatewayError.INVALID_ARGUMENT, value.value)
    return GatewayError(GatewayError.INVALID_ARGUMENT, f"unknown gateway error {value!r}")


def _call(func: Any, *args: Any) -> Any:
    """Calls a fallible host function, turning its ``Err`` into GatewayError."""
    try:
        return func(*args)
    except _Err() as e:
        raise _kind_of(e.value) from None


# ---------------------------------------------------------------------------
# Messages and JSON


def _wit_message(message: Any) -> Any:
    """A WIT ``message`` from ``str`` (text) or bytes-like (binary)."""
    w = _wit()
    if isinstance(message, str):
        return w.Message_Text(message)
    if isinstance(message, (bytes, bytearray, memoryview)):
        return w.Message_Binary(bytes(message))
    raise TypeError(f"a message is str (text) or bytes (binary), not {type(message).__name__}")


def _json_text(value: Any, sort_keys: bool) -> str:
    """``value`` as compact JSON, byte for byte what ``serde_json`` writes.

    ``serde_json::json!`` values (the Rust SDK's usual ``send_json``
    argument) keep object keys sorted, so keys are sorted by default. Raises
    GatewayError(invalid-argument) when ``value`` is not serializable, as
    the Rust SDK does.
    """
    try:
        return _json.dumps(
            value,
            ensure_ascii=False,
            separators=(",", ":"),
            sort_keys=sort_keys,
            allow_nan=False,
        )
    except (TypeError, ValueError) as e:
        raise GatewayError(GatewayError.INVALID_ARGUMENT, f"cannot serialize JSON: {e}") from None


# ---------------------------------------------------------------------------
# Connections


class Connection:
    """A handle to one connection of this route.

    Cheap to create and compare (by id); holding one does not keep the
    connection open. Every method is a host call and raises
    :class:`GatewayError` when the host refuses it (``closed`` once the
    connection is closing, ``unknown-connection`` for an id that is not an
    open connection of this route...).
    """

    __slots__ = ("_id",)

    def __init__(self, id: int) -> None:
        """Wraps a raw connection id (from an event or :meth:`Room.members`)."""
        self._id = int(id)

    @property
    def id(self) -> int:
        """The connection's id: unique for the gateway's lifetime, never reused."""
        return self._id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Connection) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"Connection({self._id})"

    # -- sending -----------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queues a message: ``str`` as text, ``bytes``-like as binary.

        Messages to one connection are delivered in the order queued.
        Raises GatewayError: ``closed``, ``too-large`` (over the route's
        limits), ``backpressure`` (outbound buffer full: not queued);
        TypeError for anything but str or bytes.
        """
        _call(_host().send, self._id, _wit_message(message))

    def send_text(self, text: str) -> None:
        """Queues a text message. Raises GatewayError as :meth:`send`."""
        _call(_host().send, self._id, _wit().Message_Text(text))

    def send_binary(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queues a binary message. Raises GatewayError as :meth:`send`."""
        _call(_host().send, self._id, _wit().Message_Binary(bytes(data)))

    def send_json(self, value: Any, *, sort_keys: bool = True) -> None:
        """Serializes ``value`` as compact JSON and queues it as a text message.

        The text is what ``serde_json`` writes for the same value in the
        Rust SDK: no spaces, non-ASCII kept as is, object keys sorted
        (``sort_keys=False`` keeps insertion order). Raises
        GatewayError(``invalid-argument``) if ``value`` is not
        JSON-serializable (or holds NaN/infinity), else as :meth:`send`.
        """
        self.send_text(_json_text(value, sort_keys))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Starts the closing handshake with ``code`` and ``reason``.

        ``code``: 1000, 1001, 1002, 1003, 1007 to 1011, or 3000 to 4999;
        ``reason``: at most 123 bytes of UTF-8. Messages already queued are
        sent first; ``on_close`` runs later, once, with this code. Raises
        GatewayError: ``invalid-argument`` (bad code), ``too-large``
        (reason), ``closed`` (already closing).
        """
        _call(_host().close, self._id, code, reason)

    # -- rooms ---------------------------------------------------------------

    def join(self, room: str) -> None:
        """Joins a room of this route (created on first join; joining twice
        changes nothing). Names are 1 to 256 bytes of UTF-8. Raises
        GatewayError: ``invalid-argument``/``too-large`` (name),
        ``limit-reached`` (too many rooms), ``closed``."""
        _call(_host().join, self._id, room)

    def leave(self, room: str) -> bool:
        """Leaves a room; returns whether the connection was in it.
        Raises GatewayError (``unknown-connection``...)."""
        return bool(_call(_host().leave, self._id, room))

    def rooms(self) -> List[str]:
        """The rooms this connection is in, in no particular order.
        Raises GatewayError (``unknown-connection``)."""
        return list(_call(_host().rooms_of, self._id))

    # -- metadata ------------------------------------------------------------

    def metadata(self, key: str) -> Optional[str]:
        """Reads a metadata entry (``None`` if unset).

        Metadata is kept by the gateway until the connection closes, survives
        instance replacement (hibernation, migration) and is readable in
        ``on_close``. Raises GatewayError (``unknown-connection``).
        """
        return _call(_host().metadata_get, self._id, key)

    #: Same as :meth:`metadata`.
    get_metadata = metadata

    def set_metadata(self, key: str, value: str) -> None:
        """Sets a metadata entry kept by the gateway.

        Keys are at most 256 bytes, values 64 KiB, at most 64 entries (by default) per
        connection. Raises GatewayError: ``too-large``, ``limit-reached``,
        ``closed``/``unknown-connection``.
        """
        _call(_host().metadata_set, self._id, key, value)

    def remove_metadata(self, key: str) -> Optional[str]:
        """Removes a metadata entry and returns its old value (``None`` if it
        was unset). Raises GatewayError (``unknown-connection``)."""
        return _call(_host().metadata_remove, self._id, key)

    # -- timers --------------------------------------------------------------

    def set_timer(self, delay: Union[float, timedelta], repeat: bool = False) -> TimerId:
        """Starts a timer: ``on_timer(conn, timer_id)`` runs after ``delay``,
        then every ``delay`` if ``repeat``, until cancelled or the connection
        closes.

        ``delay`` is in **seconds** (a float, like ``time.sleep``) or a
        ``timedelta``; it is rounded to the nearest millisecond and clamped
        to 1 ms .. 2**32-1 ms. Returns the timer's id (ids count per
        connection). Only for the connection whose event is being handled:
        any other raises ``not-owner`` (under ``isolation = "shared"`` too).
        Raises GatewayError: ``limit-reached`` (64 timers per connection by default, or a rate limit),
        ``not-owner``, ``closed``.
        """
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        ms = min(max(round(seconds * 1000.0), 1), _U32_MAX)
        return _call(_host().set_timer, self._id, ms, bool(repeat))

    def cancel_timer(self, timer_id: TimerId) -> bool:
        """Cancels a timer; returns whether it was still pending. Same as
        the module-level :func:`cancel_timer`: the host cancels the timer
        ``timer_id`` of the connection whose event is being handled (the
        WIT call takes no connection), so call it on that connection."""
        return cancel_timer(timer_id)


def cancel_timer(timer_id: TimerId) -> bool:
    """Cancels timer ``timer_id`` of the connection whose event is being
    handled (timer ids count per connection); returns whether it was still
    pending (a one-shot timer that already fired, or an unknown id, gives
    ``False``)."""
    return bool(_host().cancel_timer(timer_id))


# ---------------------------------------------------------------------------
# Rooms


def _except_id(exclude: Union[Connection, int, None]) -> Optional[int]:
    if exclude is None:
        return None
    if isinstance(exclude, Connection):
        return exclude.id
    return int(exclude)


class Room:
    """A room of this route, by name. Rooms exist while they have members;
    a handle to an empty room is valid (size 0, broadcasts reach no one)."""

    __slots__ = ("name",)

    name: str

    def __init__(self, name: str) -> None:
        """A handle to the room called ``name`` (1 to 256 bytes of UTF-8)."""
        self.name = name

    def __repr__(self) -> str:
        return f"Room({self.name!r})"

    def broadcast(self, message: Message, exclude: Union[Connection, int, None] = None) -> int:
        """Queues ``message`` (str: text, bytes: binary) to every member
        except ``exclude`` (usually the sender); returns how many
        connections it was queued for. Members whose buffer is full are
        skipped (the route's slow-consumer policy handles them). Raises
        GatewayError (``too-large``, ``invalid-argument``)."""
        return int(_call(_host().broadcast, self.name, _wit_message(message), _except_id(exclude)))

    def broadcast_text(self, text: str, exclude: Union[Connection, int, None] = None) -> int:
        """Broadcasts a text message; see :meth:`broadcast`."""
        return int(_call(_host().broadcast, self.name, _wit().Message_Text(text), _except_id(exclude)))

    def broadcast_binary(
        self, data: Union[bytes, bytearray, memoryview], exclude: Union[Connection, int, None] = None
    ) -> int:
        """Broadcasts a binary message; see :meth:`broadcast`."""
        return int(
            _call(_host().broadcast, self.name, _wit().Message_Binary(bytes(data)), _except_id(exclude))
        )

    def broadcast_json(
        self, value: Any, exclude: Union[Connection, int, None] = None, *, sort_keys: bool = True
    ) -> int:
        """Serializes ``value`` as compact JSON (as :meth:`Connection.send_json`)
        and broadcasts it as a text message; see :meth:`broadcast`."""
        return self.broadcast_text(_json_text(value, sort_keys), exclude)

    def size(self) -> int:
        """How many connections are in the room (0 if it does not exist)."""
        return int(_host().room_size(self.name))

    def members(self) -> List[Connection]:
        """The connections in the room, in no particular order."""
        return [Connection(c) for c in _host().room_members(self.name)]


def room(name: str) -> Room:
    """A handle to the room called ``name``."""
    return Room(name)


# ---------------------------------------------------------------------------
# Configuration


def config(key: str) -> Optional[str]:
    """One value of the route's ``[route.config]`` table (``None`` if absent)."""
    return _host().config_get(key)


def config_all() -> List[Tuple[str, str]]:
    """The whole ``[route.config]`` table as (key, value) pairs, sorted by key."""
    return [(k, v) for k, v in _host().config_all()]


# ---------------------------------------------------------------------------
# Requests and answers


class Header(NamedTuple):
    """One HTTP header: a ``(name, value)`` tuple. Names are lower-case on
    requests; invalid UTF-8 in values arrives as U+FFFD."""

    name: str
    value: str


class Request:
    """The HTTP upgrade request that opened a connection."""

    __slots__ = ("method", "path", "query", "headers", "remote_addr", "subprotocols")

    #: The request method; always ``"GET"``.
    method: str
    #: The path without the query string, for example ``"/chat"``.
    path: str
    #: The raw query string without the leading ``?``; ``None`` if the URL had none.
    query: Optional[str]
    #: Every request header, in the order received.
    headers: List[Header]
    #: The peer's address as ``"ip:port"``.
    remote_addr: str
    #: The subprotocols the client offered (filtered by the route's
    #: ``subprotocols``), in its order of preference.
    subprotocols: List[str]

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        query: Optional[str] = None,
        headers: Iterable[Tuple[str, str]] = (),
        remote_addr: str = "",
        subprotocols: Iterable[str] = (),
    ) -> None:
        """Builds a request (the SDK does this for you; useful in tests)."""
        self.method = method
        self.path = path
        self.query = query
        self.headers = [Header(n, v) for n, v in headers]
        self.remote_addr = remote_addr
        self.subprotocols = list(subprotocols)

    @classmethod
    def _from_wit(cls, req: Any) -> "Request":
        return cls(
            req.method,
            req.path,
            req.query,
            ((h.name, h.value) for h in req.headers),
            req.remote_addr,
            req.subprotocols,
        )

    def __repr__(self) -> str:
        return (
            f"Request(method={self.method!r}, path={self.path!r}, query={self.query!r}, "
            f"remote_addr={self.remote_addr!r}, subprotocols={self.subprotocols!r})"
        )

    def header(self, name: str) -> Optional[str]:
        """The first value of a header, by case-insensitive name (``None`` if absent)."""
        lower = name.lower()
        for h in self.headers:
            if h.name.lower() == lower:
                return h.value
        return None

    def query_param(self, name: str) -> Optional[str]:
        """The first value of a query parameter, percent-decoded (``+`` is a
        space; invalid escapes are kept as they are, invalid UTF-8 becomes
        U+FFFD). A parameter without ``=`` has the value ``""``; ``None``
        if absent or there is no query string."""
        if self.query is None:
            return None
        for pair in self.query.split("&"):
            k, _, v = pair.partition("=")
            if _percent_decode(k) == name:
                return _percent_decode(v)
        return None


_HEX = "0123456789abcdefABCDEF"


def _percent_decode(s: str) -> str:
    """Decodes ``%XX`` escapes and ``+`` exactly as the Rust SDK does."""
    data = s.encode("utf-8")
    if b"%" not in data and b"+" not in data:
        return s
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x2B:  # '+'
            out.append(0x20)
        elif b == 0x25 and i + 2 < n:  # '%'
            hi, lo = chr(data[i + 1]), chr(data[i + 2])
            if hi in _HEX and lo in _HEX:
                out.append(int(hi + lo, 16))
                i += 2
            else:
                out.append(b)
        else:
            out.append(b)
        i += 1
    return out.decode("utf-8", "replace")


@dataclass(frozen=True)
class Fragment:
    """One fragment of a message, for routes with ``deliver = "fragments"``."""

    #: Whether the message is text (its bytes are UTF-8, but a character may
    #: be split between fragments) or binary.
    text: bool
    #: Whether this is the message's first fragment.
    first: bool
    #: Whether this is the message's final fragment (the FIN bit).
    fin: bool
    #: The fragment's payload.
    data: bytes


class OpenResponse:
    """What ``on_open`` answers: accept the connection or reject the upgrade.

    Build one with :meth:`accept`, :meth:`accept_with` or :meth:`reject`.
    (``on_open`` returning ``None`` also accepts.)
    """

    __slots__ = ("accepted", "subprotocol", "status", "headers", "body")

    #: Whether this completes the WebSocket handshake.
    accepted: bool
    #: The selected subprotocol (accept only); one the client offered.
    subprotocol: Optional[str]
    #: The HTTP status (reject only), 400 to 599; others are sent as 500.
    status: int
    #: Extra response headers (``101`` headers on accept).
    headers: List[Header]
    #: The response body (reject only).
    body: bytes

    def __init__(
        self,
        accepted: bool,
        subprotocol: Optional[str] = None,
        status: int = 0,
        headers: Iterable[Tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        """Prefer the class methods."""
        self.accepted = accepted
        self.subprotocol = subprotocol
        self.status = status
        self.headers = [Header(n, v) for n, v in headers]
        self.body = body

    def __repr__(self) -> str:
        if self.accepted:
            return f"OpenResponse.accept_with({self.subprotocol!r})" if self.subprotocol else "OpenResponse.accept()"
        return f"OpenResponse.reject({self.status}, {self.body!r})"

    @classmethod
    def accept(cls, headers: Iterable[Tuple[str, str]] = ()) -> "OpenResponse":
        """Accept the connection without a subprotocol; ``headers`` are added
        to the ``101 Switching Protocols`` response."""
        return cls(True, None, 0, headers)

    @classmethod
    def accept_with(cls, subprotocol: str, headers: Iterable[Tuple[str, str]] = ()) -> "OpenResponse":
        """Accept the connection selecting ``subprotocol``, which must be one
        of ``request.subprotocols`` (anything else: the gateway answers 500)."""
        return cls(True, subprotocol, 0, headers)

    @classmethod
    def reject(
        cls,
        status: int,
        body: Union[str, bytes] = b"",
        headers: Iterable[Tuple[str, str]] = (),
    ) -> "OpenResponse":
        """Reject the upgrade with HTTP ``status`` (400 to 599) and ``body``
        (str is sent as UTF-8). A ``content-type: text/plain; charset=utf-8``
        header is added unless ``headers`` has a content-type."""
        hs = [Header(n, v) for n, v in headers]
        if not any(h.name.lower() == "content-type" for h in hs):
            hs.insert(0, Header("content-type", "text/plain; charset=utf-8"))
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        return cls(False, None, int(status), hs, data)

    def _to_wit(self) -> Any:
        w = _wit()
        headers = [w.Header(h.name, h.value) for h in self.headers]
        if self.accepted:
            return w.OpenResponse_Accept(w.Accept(self.subprotocol, headers))
        return w.OpenResponse_Reject(w.Reject(self.status, headers, self.body))


# ---------------------------------------------------------------------------
# Handlers


class Handler:
    """The event handlers of a plugin; subclass it and override what you need.

    One handler object serves every connection of its plugin instance, so
    keep per-connection state keyed by ``conn.id``. Calls for one connection
    never overlap. Every method has a default: accept every connection and
    ignore every event.
    """

    def on_open(self, conn: Connection, request: Request) -> Optional[OpenResponse]:
        """A client asks to open a connection; accept or reject it.

        Runs before the handshake completes. Host calls for ``conn`` (send,
        join, metadata, timers) already work; what is sent is delivered
        right after the handshake. A rejected connection's rooms, metadata
        and timers are discarded without ``on_close``. Returning ``None``
        accepts.
        """
        return OpenResponse.accept()

    def on_message(self, conn: Connection, message: Message) -> None:
        """A complete message arrived: ``str`` (text) or ``bytes`` (binary).
        Not called on routes with ``deliver = "fragments"``."""

    def on_fragment(self, conn: Connection, fragment: Fragment) -> None:
        """On routes with ``deliver = "fragments"`` only: a fragment of a
        message arrived (instead of :meth:`on_message`), in order."""

    def on_close(self, conn: Connection, code: int, reason: str) -> None:
        """The connection closed: exactly once per accepted connection.

        ``code`` is the peer's close code (1005: none given, 1006: vanished)
        or the one the gateway or plugin sent. Sending to ``conn`` raises
        ``closed`` here; its metadata and rooms are still readable.
        """

    def on_timer(self, conn: Connection, timer_id: TimerId) -> None:
        """A timer set with :meth:`Connection.set_timer` fired."""

    def on_resume(self, conn: Connection, request: Request) -> None:
        """The connection continues on a new instance of the plugin.

        After a reload on a route with ``on_reload = "migrate"``, when a
        hibernated connection wakes, or when a shared instance was
        replaced. This instance has none of the previous one's memory; the
        connection's rooms, metadata and timers are intact, so rebuild
        per-connection state from :meth:`Connection.metadata` here.
        ``request`` is the original upgrade request. Runs before the event
        that woke the connection.
        """


_handler: Optional[Handler] = None


def export(handler: Union[Handler, Type[Handler]]) -> None:
    """Makes ``handler`` (a :class:`Handler` subclass, instantiated with no
    arguments, or an instance) the plugin's handler. Call it exactly once,
    at the top level of ``app.py``. Raises RuntimeError if called twice,
    TypeError if ``handler`` is not a Handler."""
    global _handler
    if _handler is not None:
        raise RuntimeError("wasmgate.export() was called twice: a plugin has one handler")
    if isinstance(handler, type):
        handler = handler()
    if not isinstance(handler, Handler):
        raise TypeError(f"wasmgate.export() takes a wasmgate.Handler subclass, not {type(handler).__name__}")
    _handler = handler


def _exported() -> Handler:
    if _handler is None:
        raise RuntimeError("no handler: app.py must call wasmgate.export(YourHandler)")
    return _handler


# ---------------------------------------------------------------------------
# The glue the component exports call (see wasmgate/_component.py).


def _report(event: str, conn: Connection) -> None:
    """Logs the exception being handled, with its traceback."""
    log.error(f"{event} for connection {conn.id} raised an exception:\n{_traceback.format_exc().rstrip()}")


def _fail(event: str, conn: Connection) -> None:
    """A handler raised: log it and close the connection with 1011, as the
    gateway does when a plugin traps (without losing the instance)."""
    _report(event, conn)
    try:
        conn.close(1011, "internal error")
    except GatewayError:
        pass


def _dispatch_open(conn_id: int, req: Any) -> Any:
    conn = Connection(conn_id)
    try:
        resp = _exported().on_open(conn, Request._from_wit(req))
        if resp is None:
            resp = OpenResponse.accept()
        elif not isinstance(resp, OpenResponse):
            raise TypeError(f"on_open must return an OpenResponse or None, not {type(resp).__name__}")
        return resp._to_wit()
    except BaseException:  # SystemExit and KeyboardInterrupt too: nothing may trap the instance
        _report("on_open", conn)
        return OpenResponse.reject(500, "plugin failed\n")._to_wit()


def _dispatch_message(conn_id: int, msg: Any) -> None:
    conn = Connection(conn_id)
    try:
        _exported().on_message(conn, msg.value)
    except BaseException:  # SystemExit and KeyboardInterrupt too: nothing may trap the instance
        _fail("on_message", conn)


def _dispatch_fragment(conn_id: int, fragment: Any) -> None:
    conn = Connection(conn_id)
    try:
        _exported().on_fragment(conn, Fragment(fragment.text, fragment.first, fragment.fin, fragment.data))
    except BaseException:  # SystemExit and KeyboardInterrupt too: nothing may trap the instance
        _fail("on_fragment", conn)


def _dispatch_close(conn_id: int, code: int, reason: str) -> None:
    conn = Connection(conn_id)
    try:
        _exported().on_close(conn, code, reason)
    except BaseException:  # SystemExit and KeyboardInterrupt too: nothing may trap the instance
        _report("on_close", conn)


def _dispatch_timer(conn_id: int, timer_id: int) -> None:
    conn = Connection(conn_id)
    try:
        _exported().on_timer(conn, timer_id)
    except BaseException:  # SystemExit and KeyboardInterrupt too: nothing may trap the instance
        _fail("on_timer", conn)


def _dispatch_resume(conn_id: int, req: Any) -> None:
    conn = Connection(conn_id)
    try:
        _exported().on_resume(conn, Request._from_wit(req))
    except BaseException:  # SystemExit and KeyboardInterrupt too: nothing may trap the instance
        _fail("on_resume", conn)
