"""What goes out on the wire: NDJSON or SSE line streams, and timestamps."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .keys import RESPONSE_HEADERS

NDJSON = "application/x-ndjson"


def rfc3339(ts: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class LineStream:
    """One JSON object per line (NDJSON) or per SSE `data:` event, flushed as written."""

    def __init__(self, request: web.Request, *, sse: bool = False):
        self._request = request
        self._sse = sse
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8" if sse else NDJSON,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **request.get(RESPONSE_HEADERS, {}),
            }
        )
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self._request)

    async def send(self, obj: Any, *, event: str | None = None) -> None:
        await self.start()
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        if self._sse:
            line = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
        else:
            line = data + "\n"
        await self.response.write(line.encode("utf-8"))

    async def send_raw(self, text: str) -> None:
        await self.start()
        await self.response.write(text.encode("utf-8"))

    async def finish(self) -> web.StreamResponse:
        await self.start()
        await self.response.write_eof()
        return self.response
