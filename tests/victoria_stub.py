"""A stand-in for Victoria, the agent service at the end of the router's chain
(DESIGN.md, "Victoria"): GET /health, POST /run and POST /stream (SSE).

Its answer is made from what it was sent, so tests can see the router's translation:
"Victoria: <goal> [<n> earlier turns]". A goal that starts with "clarify:" gets
`needs_clarification` with two questions. Every accepted body is kept in
app[REQUESTS]. /stream sends the answer word by word as `token` events, then a
`done` event that repeats the whole output (as agent services often do), then [DONE].
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

REQUESTS = web.AppKey("requests", list)
QUESTIONS = ["Which city do you mean?", "For which day?"]


def answer(goal: str, history: list[dict[str, str]]) -> dict[str, Any]:
    if goal.startswith("clarify:"):
        return {"status": "needs_clarification", "clarification_questions": QUESTIONS}
    return {"status": "success", "output": f"Victoria: {goal} [{len(history)} earlier turns]", "steps_taken": 1}


async def _accept(request: web.Request) -> tuple[str, list[dict[str, str]]]:
    """The contract's body, or a 422 that says what is wrong."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPUnprocessableEntity(text=json.dumps({"detail": "body is not JSON"}), content_type="application/json") from None
    goal = body.get("goal") if isinstance(body, dict) else None
    history = body.get("chat_history", []) if isinstance(body, dict) else None
    problems = []
    if not isinstance(goal, str) or not goal:
        problems.append("'goal' must be a non-empty string")
    if not isinstance(history, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history
    ):
        problems.append("'chat_history' must be a list of {role, content} strings")
    if problems:
        raise web.HTTPUnprocessableEntity(text=json.dumps({"detail": problems}), content_type="application/json")
    request.app[REQUESTS].append(body)
    return goal, history


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def run(request: web.Request) -> web.Response:
    goal, history = await _accept(request)
    return web.json_response(answer(goal, history))


async def stream(request: web.Request) -> web.StreamResponse:
    goal, history = await _accept(request)
    result = answer(goal, history)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(event: str, data: Any) -> None:
        await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

    await send("start", {"type": "start", "goal": goal})
    if result["status"] == "success":
        words = result["output"].split(" ")
        for i, word in enumerate(words):
            await send("token", {"type": "token", "content": word + (" " if i < len(words) - 1 else "")})
            await asyncio.sleep(0.005)
    await send("done", {"type": "done", **result})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def create_victoria_app() -> web.Application:
    app = web.Application()
    app[REQUESTS] = []
    app.router.add_get("/health", health)
    app.router.add_post("/run", run)
    app.router.add_post("/stream", stream)
    return app
