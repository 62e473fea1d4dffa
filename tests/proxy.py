"""A small TCP proxy between the store and its database server, to cut connections on purpose.

``cut_after_commit``: with this probability, a client-to-server packet that sends ``COMMIT`` is
forwarded and then the connection is closed before the answer comes back (the commit may have
landed, its acknowledgement is lost). On PostgreSQL a statement sent outside a transaction block
(a packet ending in Sync after the server said it was idle) commits as it ends: it counts too
(the store's one-statement steps). ``cut_anywhere``: the probability of cutting at any other
packet. ``down()`` closes every connection and refuses new ones until ``up()``.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading

READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # PostgreSQL's ReadyForQuery, then the status: I, T or E
SYNC = b"S\x00\x00\x00\x04"  # the Sync that ends an extended-protocol statement


class Proxy:
    def __init__(
        self, target: tuple[str, int], *, cut_after_commit: float = 0.0, cut_anywhere: float = 0.0, seed: int = 7
    ) -> None:
        self.target = target
        self.cut_after_commit = cut_after_commit
        self.cut_anywhere = cut_anywhere
        self.random = random.Random(seed)
        self.cuts = 0
        self.commit_cuts = 0
        self.statement_cuts = 0  # of those, PostgreSQL statements outside a transaction block
        self.max_cuts = 1_000_000
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._down = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def down(self) -> None:
        with self._lock:
            self._down = True
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _close(*pair)

    def up(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        self._closed = True
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
            if down:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True, name="proxy-pump").start()

    def _should_cut(self, chance: float) -> bool:
        with self._lock:
            if chance <= 0 or self.cuts >= self.max_cuts or self.random.random() >= chance:
                return False
            self.cuts += 1
            return True

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        idle = False  # PostgreSQL: the server's last ReadyForQuery said "idle" (no transaction block)
        try:
            while True:
                readable, _, _ = select.select([client, server], [], [], 1.0)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is server and data[-6:-1] == READY_FOR_QUERY:
                        idle = data[-1:] == b"I"
                    commit = b"COMMIT" in data.upper() or (idle and data.endswith(SYNC))
                    if source is client and commit and self._should_cut(self.cut_after_commit):
                        server.sendall(data)  # the commit reaches the server; its answer never comes back
                        with self._lock:
                            self.commit_cuts += 1
                            self.statement_cuts += b"COMMIT" not in data.upper()
                        return
                    if self._should_cut(self.cut_anywhere):
                        return
                    peers[source].sendall(data)
        except (OSError, ValueError):  # ValueError: the proxy closed the sockets (fd -1) under select
            return
        finally:
            _close(client, server)
            with self._lock:
                if (client, server) in self._pairs:
                    self._pairs.remove((client, server))


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
