"""The companion router: each request goes to the MLX daemon first, then to Ollama,
then to Victoria (an agent service), so that a caller always gets an answer.

One core, two faces: the `Router` library (`await router.chat(...)`) and a proxy
(`create_router_app`, `mlx-server route`) that speaks the Ollama API and OpenAI chat.

A miss (connection refused, timeout, 404, 503, any error before the first chunk)
moves on to the next backend. Once a chunk has gone to the caller the backend is
fixed, and a later failure becomes an error chunk in the caller's format.
Transport failures feed a circuit breaker per backend, so a dead backend is skipped
for a cool-down instead of costing every request a timeout; a backend that answers
at all (even 404 or 503) is up. MLX and Ollama are spoken to in the Ollama API,
always streamed upstream whatever the caller asked; Victoria gets
`{goal, chat_history}` on /run (one answer) or /stream (SSE).

    async with Router() as router:  # MLX_API_URL, OLLAMA_URL, VICTORIA_URL or defaults
        reply = await router.chat("qwen", [{"role": "user", "content": "hi"}])
        print(reply.backend, reply.text)
        async with await router.chat("qwen", messages, stream=True) as stream:
            async for chunk in stream:  # Ollama /api/chat chunks, from stream.backend
                ...
"""

from .config import BackendConfig, RouterConfig, load_router_config
from .core import AnswerFailed, Reply, Router, Stream, Unanswered
from .proxy import HEADER, ROUTER, create_router_app, main_route

__all__ = [
    "HEADER", "ROUTER", "AnswerFailed", "BackendConfig", "Reply", "Router", "RouterConfig", "Stream", "Unanswered",
    "create_router_app", "load_router_config", "main_route",
]
