"""Free loopback ports for local clusters (the CLI's dashboard, the benchmarks' and tests' Serve proxies)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: every socket stays bound until all are chosen (closing each one at once
    lets the kernel hand the same port out twice: HTTP and gRPC proxies then collide)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
