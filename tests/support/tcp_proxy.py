"""A TCP forwarder on loopback that a test can cut and restore: an upstream outage
without stopping the upstream (which other tests share).

    proxy = TcpProxy("127.0.0.1", prom_port).start()   # proxy.url -> Prometheus
    proxy.down()   # new connections refused, open ones closed
    proxy.up()     # same port again
    proxy.stop()

`record=True` keeps what clients sent (the first TAP_BYTES), so a test can read the
requests that reached the upstream (`proxy.sent()`), headers and all.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.support.procs import free_port

TAP_BYTES = 4 * 1024 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int | None = None, *,
                 record: bool = False) -> None:
        self.target = (target_host, target_port)
        self._record = record
        self._sent = bytearray()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()

    def start(self) -> TcpProxy:
        self._thread.start()
        self.up()
        return self

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    tap: bytearray | None = None) -> None:
        try:
            while data := await reader.read(65536):
                if tap is not None and len(tap) < TAP_BYTES:
                    tap.extend(data[:TAP_BYTES - len(tap)])
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._streams.update((writer, up_writer))
        try:
            tap = self._sent if self._record else None
            await asyncio.gather(self._pipe(reader, up_writer, tap), self._pipe(up_reader, writer))
        finally:
            self._streams.difference_update((writer, up_writer))

    async def _up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._streams):
            w.close()
        self._streams.clear()

    def up(self) -> None:
        self._call(self._up())

    def sent(self) -> bytes:
        """What clients sent through the proxy so far (with `record=True`)."""
        return bytes(self._sent)

    def down(self) -> None:
        self._call(self._down())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
