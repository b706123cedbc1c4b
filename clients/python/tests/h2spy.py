"""A TCP proxy that watches the HTTP/2 frames going through it, to see what a
client sends on the wire (keepalive PINGs).

It forwards every frame as it is, but one thing: with ``absorb_server_pings``
it answers the server's PINGs itself instead of passing them on. The service
pings every connection every 30 s, which is also the client's keepalive time,
and a client sends its keepalive PING only when it has read nothing for that
long: to see the client's own PINGs against the live service, the client must
not see the server's."""

from __future__ import annotations

import socket
import threading
import time
from typing import List, Tuple

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PING = 0x6
GOAWAY = 0x7
ACK = 0x1


class H2Spy:
    """Listens on 127.0.0.1:<free port> and forwards every connection to
    ``upstream`` (host:port), recording each frame as (monotonic time,
    direction "c2s" or "s2c", type, flags)."""

    def __init__(self, upstream: str, *, absorb_server_pings: bool = False) -> None:
        self.absorb_server_pings = absorb_server_pings
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.frames: List[Tuple[float, str, int, int]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: List[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def pings(self, direction: str = "c2s") -> List[float]:
        """Times of the PINGs (not their ACKs) sent in ``direction``."""
        with self._lock:
            return [t for t, d, typ, flags in self.frames if d == direction and typ == PING and not flags & ACK]

    def goaways(self) -> List[Tuple[float, str]]:
        with self._lock:
            return [(t, d) for t, d, typ, _ in self.frames if typ == GOAWAY]

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "H2Spy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._socks += [client, server]
            to_server = _Sender(server)
            to_client = _Sender(client)
            threading.Thread(target=self._pump, args=(client, to_server, None, "c2s"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, to_client, to_server, "s2c"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: "_Sender", back: "_Sender", direction: str) -> None:
        buf = b""
        if direction == "c2s":
            buf = b""
            while len(buf) < len(PREFACE):
                data = src.recv(len(PREFACE) - len(buf))
                if not data:
                    return
                buf += data
            dst.send(buf)
            buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    frame, buf = buf[: 9 + length], buf[9 + length :]
                    typ, flags = frame[3], frame[4]
                    with self._lock:
                        self.frames.append((time.monotonic(), direction, typ, flags))
                    if direction == "s2c" and self.absorb_server_pings and typ == PING and not flags & ACK:
                        # Answer it ourselves: same payload, ACK flag set.
                        back.send(frame[:4] + bytes([ACK]) + frame[5:])
                        continue
                    dst.send(frame)
        except OSError:
            pass
        finally:
            for s in (src, dst.sock):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Sender:
    """sendall on one socket from two threads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)
