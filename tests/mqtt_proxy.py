"""A TCP proxy between a client and an MQTT broker that can misbehave like a bad network or a bad broker.

- `blackhole = True`: bytes in both directions vanish (connections stay open, new ones are accepted and
  never answered): a dead route; the client only notices through keepalive and timeouts. Turning it off
  cuts what was black-holed (those streams have lost bytes), so clients reconnect.
- `cut()`: every connection aborted (RST), mid-stream.
- `drop_pubacks = True`: PUBACK packets (type 4) from the broker to the client are dropped; everything
  else passes. The broker->client stream is parsed by MQTT fixed header for that.
"""

from __future__ import annotations

import asyncio
import contextlib

PUBACK = 4


def split_packets(buf: bytearray) -> list[bytes]:
    """Complete MQTT packets at the start of `buf` (removed from it); a partial packet stays."""
    out: list[bytes] = []
    while True:
        length = 0
        shift = 0
        i = 1
        while True:
            if i >= len(buf):
                return out
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ValueError("malformed MQTT remaining length")
        end = i + length
        if end > len(buf):
            return out
        out.append(bytes(buf[:end]))
        del buf[:end]


class MqttProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.blackhole = False
        self.drop_pubacks = False
        self.pubacks_dropped = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> MqttProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def end_blackhole(self) -> None:
        self.blackhole = False
        self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            self._writers.add(up_writer)
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer, parse=False)),
                asyncio.create_task(self._pump(up_reader, writer, parse=True)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                writer.transport.abort()
                up_writer.transport.abort()
                self._writers.discard(up_writer)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, parse: bool) -> None:
        buf = bytearray()
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if self.blackhole:
                    continue
                if not parse:
                    dst.write(data)
                else:
                    buf += data
                    for packet in split_packets(buf):
                        if self.drop_pubacks and packet[0] >> 4 == PUBACK:
                            self.pubacks_dropped += 1
                            continue
                        dst.write(packet)
                await dst.drain()
