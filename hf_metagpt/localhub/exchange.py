"""The request/response surface endpoints see, as a Protocol: they never import the HTTP handler."""

from __future__ import annotations

import socket
from typing import Any, BinaryIO, Protocol


class Exchange(Protocol):
    """One request being answered (implemented by `transport.Handler`)."""

    command: str
    headers: Any
    raw_path: str
    query: dict[str, list[str]]
    body: Any
    connection: socket.socket
    wfile: BinaryIO
    close_connection: bool
    drop_after: int | None  # an injected fault: cut the connection after this many body bytes

    def send_bytes(self, status: int, body: bytes = b"", headers: dict | None = None,
                   content_type: str = "application/json") -> None: ...

    def send_json(self, obj: Any, status: int = 200, headers: dict | None = None,
                  content_type: str = "application/json") -> None: ...

    def send_head(self, status: int, length: int, headers: dict | None = None,
                  content_type: str = "application/json") -> None: ...

    def json_body(self) -> Any: ...

    def base_url(self) -> str: ...
