"""TCP listeners on 127.0.0.1 that behave as a busy or broken node does, for the client's network paths."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class Listener:
    """Accepts connections and, for each: `close` closes it at once (a node past sshd's MaxStartups);
    `silent` holds it open and never speaks (a node too busy to answer); `banner` sends an SSH banner,
    then nothing. With `forward_to`, connections after the first `close_first` are relayed to that port."""

    def __init__(self, mode: str, close_first: int = 0, forward_to: int | None = None) -> None:
        self.mode = mode
        self.close_first = close_first
        self.forward_to = forward_to
        self.accepted = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.cut()

    def cut(self) -> None:
        """Stop listening and end every connection at once, as a network that goes away does (a relayed
        connection's peers see it end: shut down, not only closed, which a thread blocked on it would hold)."""
        self._stopping = True
        # Shutting the listening socket down wakes accept(); closing alone does not on Linux.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=10)
        for held in self._held:
            with contextlib.suppress(OSError):
                held.shutdown(socket.SHUT_RDWR)
            held.close()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "close" or self.accepted <= self.close_first:
                connection.close()
            elif self.forward_to is not None:
                self._relay(connection, self.forward_to)
            else:
                if self.mode == "banner":
                    connection.sendall(b"SSH-2.0-OpenSSH_9.9 busy\r\n")
                self._held.append(connection)

    def _relay(self, client: socket.socket, port: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", port))
        self._held += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
