"""A Redis URL nobody listens on (for failure paths)."""

from __future__ import annotations

import socket


def closed_port_url() -> str:
    """redis://127.0.0.1:PORT where PORT was free a moment ago (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"
