"""Each figure of issue 7, measured against its peer in the same run.

Every repetition runs the daemon and its peer back to back (alternating which goes
first), so load from other programs on the machine hits both sides alike; each
figure is the median over repetitions, after warm-up runs that are not counted.
Every prompt is unique within a run (a tag leads the text), so no server answers
from a prompt cache except where the prompt-cache figure asks for it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from mlx_server.testing import DaemonProcess

from peers import RawModel, batch_generate, longest_silence, mlx_lm_server, raw_generate
from report import Row
from streams import Stream, Target, concurrent, post_json, stream_chat

STEADY_TOKENS = 600  # longer than any stream in the gap figures runs before it is stopped
FILLER = (
    "A model server keeps models in memory and answers requests over HTTP. Streaming sends "
    "each token as soon as it is decoded. Memory pressure makes the reaper unload idle models "
    "in least recently used order. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14. "
)


@dataclass(frozen=True, slots=True)
class Pair:
    """The daemon and its peer, each serving the same model."""

    daemon: Target
    peer: Target

    def in_turn(self, rep: int) -> tuple[Target, Target]:
        return (self.daemon, self.peer) if rep % 2 == 0 else (self.peer, self.daemon)


def ask(tag: str) -> list[dict[str, str]]:
    """A short, unique chat (about 30 tokens with the test tokenizer)."""
    return [{"role": "user", "content": f"{tag}: write a haiku about the sea."}]


def counting(tag: str) -> list[dict[str, str]]:
    """A unique chat the real model answers at length, with text on every token. The tag
    leads a system turn: without one, SmolLM2's template puts its default system prompt
    first, a prefix every server would have cached and raw stream_generate would not."""
    return [{"role": "system", "content": f"{tag}."}, {"role": "user", "content": "Count from 1 to 1000, one number per line."}]


def steady_chats(raw: RawModel, tag: str, count: int, tokens: int) -> list[list[dict[str, str]]]:
    """`count` short chats whose greedy answers show text on every token (a character
    may take two) over their first `tokens` tokens.

    The real model needs no search: it counts, a number per line. The random test model
    often emits byte tokens that make no text until a character is whole, in runs of up to
    hundreds of tokens. Servers send a line only when there is text, and streams are timed
    by their lines, so such a run would read as a stall: its chats are searched for."""
    if raw.real:
        return [counting(f"{tag}-{i}") for i in range(count)]
    chats: list[list[dict[str, str]]] = []
    for i in range(100 * count):
        chat = ask(f"{tag}-{i}")
        if longest_silence(raw, raw.prompt(chat), tokens) <= 2:
            chats.append(chat)
            if len(chats) == count:
                return chats
    raise RuntimeError(f"fewer than {count} of {100 * count} chats answer with text on every token")


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- one stream: tokens/s against raw stream_generate, and time to first token ---------


async def one_stream(http: aiohttp.ClientSession, raw: RawModel, pair: Pair, max_tokens: int, reps: int, notes: list[str]) -> list[Row]:
    """Each repetition runs raw, a bare BatchGenerator, the daemon and mlx_lm.server back
    to back on one prompt; ratios are taken within a repetition, then the median."""
    for side in (pair.daemon, pair.peer):
        await stream_chat(http, side, ask("warm-up one"), max_tokens)
    raw_generate(raw, raw.prompt(ask("warm-up one")), max_tokens)
    batch_generate(raw, [raw.prompt(ask("warm-up one"))], max_tokens)
    raws, batches, daemon, peer = [], [], [], []
    for rep, messages in enumerate(steady_chats(raw, "one", reps, 1)):
        ids = raw.prompt(messages)
        first, last = pair.in_turn(rep)
        streams = {first.label: await stream_chat(http, first, messages, max_tokens)}
        raws.append(raw_generate(raw, ids, max_tokens))
        batches += batch_generate(raw, [ids], max_tokens)
        streams[last.label] = await stream_chat(http, last, messages, max_tokens)
        daemon.append(streams[pair.daemon.label])
        peer.append(streams[pair.peer.label])
    same = sum(d.text == r.text for d, r in zip(daemon, raws))
    notes.append(
        f"one stream: {max_tokens} tokens asked; tokens counted raw {sorted({r.tokens for r in raws})}, "
        f"daemon {sorted({s.tokens for s in daemon})}, mlx_lm.server {sorted({s.tokens for s in peer})}; "
        f"daemon text identical to raw greedy text in {same} of {reps} runs; "
        f"a negative TTFT difference means the first token arrived over HTTP sooner than stream_generate yielded it"
    )
    raw_rate = f"raw {median([r.rate for r in raws]):.0f} tok/s"
    raw_prefill = f"raw prefill {median([r.prefill for r in raws]) * 1e3:.1f} ms"
    rows = []
    for name, runs, target in (
        ("one stream, tokens/s ÷ raw stream_generate", daemon, (">=", 0.98)),
        ("  (reference) mlx_lm.server one stream ÷ raw", peer, None),
        ("  (reference) bare BatchGenerator in-process ÷ raw", batches, None),
    ):
        value = f"{median([r.rate for r in runs]):.0f} tok/s"
        rows.append(Row(name, value, raw_rate, median([r.rate / w.rate for r, w in zip(runs, raws)]), "x", target))
    for name, runs, target in (
        ("time to first token − raw prefill, one stream", daemon, ("<=", 5.0)),
        ("  (reference) mlx_lm.server TTFT − raw prefill", peer, None),
    ):
        value = f"{median([s.ttft for s in runs]) * 1e3:.1f} ms"
        rows.append(Row(name, value, raw_prefill, median([(s.ttft - w.prefill) * 1e3 for s, w in zip(runs, raws)]), "ms", target))
    return rows


# --- concurrent streams: aggregate tokens/s against mlx_lm.server -----------------------


async def concurrency(http: aiohttp.ClientSession, raw: RawModel, pair: Pair, streams: int, max_tokens: int, reps: int, target: float, notes: list[str]) -> list[Row]:
    """Aggregate tokens/s of `streams` simultaneous streams (first send to last token),
    for the daemon, mlx_lm.server and a bare in-process BatchGenerator."""
    warm = [ask(f"warm-up c{streams}-{i}") for i in range(streams)]
    for side in (pair.daemon, pair.peer):
        await concurrent(http, side, warm, max_tokens)
    batch_generate(raw, [raw.prompt(m) for m in warm], max_tokens)
    rates: dict[str, list[float]] = {pair.daemon.label: [], pair.peer.label: [], "batch": []}
    counts: dict[str, set[int]] = {pair.daemon.label: set(), pair.peer.label: set()}

    async def served(side: Target, conversations: list[list[dict[str, str]]]) -> None:
        wall, results = await concurrent(http, side, conversations, max_tokens)
        rates[side.label].append(sum(s.tokens for s in results) / wall)
        counts[side.label] |= {s.tokens for s in results}

    for rep in range(reps):
        conversations = [ask(f"c{streams}-{rep}-{i}") for i in range(streams)]
        first, last = pair.in_turn(rep)
        await served(first, conversations)
        runs = batch_generate(raw, [raw.prompt(m) for m in conversations], max_tokens)
        rates["batch"].append(sum(r.tokens for r in runs) / max(r.seconds for r in runs))
        await served(last, conversations)
    notes.append(f"{streams} streams: tokens per stream daemon {sorted(counts[pair.daemon.label])}, mlx_lm.server {sorted(counts[pair.peer.label])} ({max_tokens} asked)")
    d, p, b = rates[pair.daemon.label], rates[pair.peer.label], rates["batch"]
    return [
        Row(f"{streams} concurrent streams, aggregate tokens/s ÷ mlx_lm.server", f"{median(d):.0f} tok/s", f"{median(p):.0f} tok/s", median([x / y for x, y in zip(d, p)]), "x", (">=", target)),
        Row(f"  (reference) daemon ÷ bare BatchGenerator, {streams} streams", f"{median(d):.0f} tok/s", f"{median(b):.0f} tok/s", median([x / y for x, y in zip(d, b)]), "x", None),
    ]


# --- alternating between two resident models -------------------------------------------


async def _sequence(http: aiohttp.ClientSession, targets: list[Target], tag: str, max_tokens: int) -> list[float]:
    """Requests one after another, each timed; the first model is warmed first."""
    await stream_chat(http, targets[0], ask(f"{tag}-warm"), max_tokens)
    return [(await stream_chat(http, target, ask(f"{tag}-{i}"), max_tokens)).seconds for i, target in enumerate(targets)]


async def alternating(http: aiohttp.ClientSession, a: Pair, b: Pair, requests: int, max_tokens: int, reps: int, notes: list[str]) -> list[Row]:
    """The same requests on one model, then alternating between two; by repetition, the
    order of the two sequences and which model leads both alternate. The ratio is of median
    request durations, pooled over the repetitions, leaving out each sequence's first
    request (it never switches): a median of many short requests shrugs off bursts of load
    from other programs on the machine."""
    durations: dict[tuple[str, str], list[float]] = {}
    for rep in range(reps):
        for x, y in ((a.daemon, b.daemon), (a.peer, b.peer)):
            first, second = (x, y) if rep % 2 == 0 else (y, x)
            sequences = {"one": [first] * requests, "two": [first, second] * (requests // 2)}
            for kind in ("one", "two") if rep % 2 == 0 else ("two", "one"):
                timed = await _sequence(http, sequences[kind], f"{kind}-model-{rep}", max_tokens)
                durations.setdefault((x.label, kind), []).extend(timed[1:])
    notes.append(
        f"alternating: {reps} repetitions of {requests} requests of {max_tokens} tokens on two ~150 MB models; "
        "mlx_lm.server reloads a model on every switch (from the page cache here: a cold disk costs it more)"
    )
    rows = []
    for name, side, target in (
        ("alternating two resident 150 MB models ÷ one model", a.daemon, ("<=", 1.15)),
        ("  (reference) mlx_lm.server alternating ÷ one model", a.peer, None),
    ):
        two, one = median(durations[side.label, "two"]), median(durations[side.label, "one"])
        rows.append(Row(name, f"{two:.3f} s/request", f"one model {one:.3f} s/request", two / one, "x", target))
    return rows


# --- a load while another model streams --------------------------------------------------


def _gaps(arrivals: tuple[float, ...], start: float, end: float) -> list[float]:
    """The inter-arrival gaps that overlap the window [start, end]."""
    return [b - a for a, b in zip(arrivals, arrivals[1:]) if b > start and a < end]


async def load_gap(http: aiohttp.ClientSession, raw: RawModel, streaming: Target, url: str, loaded: str, reps: int, notes: list[str]) -> list[Row]:
    """Stream on one model, load another through the API, and compare the worst
    inter-token gap in the load window with the stream's median gap; a window of the
    same length after the load, with nothing loading, shows the machine's own noise."""
    during, control, worst, quiet_worst, typical, loads = [], [], [], [], [], []
    (chat,) = steady_chats(raw, "gap", 1, STEADY_TOKENS)
    for rep in range(reps):
        stop = asyncio.Event()
        task = asyncio.create_task(stream_chat(http, streaming, chat, 3500, stop=stop))
        try:
            await asyncio.sleep(0.5)
            start = time.perf_counter()
            await post_json(http, url + "/api/generate", {"model": loaded, "prompt": ""})
            end = time.perf_counter()
            await asyncio.sleep(end - start + 0.3)
        finally:
            stop.set()
        stream: Stream = await task
        await post_json(http, url + "/api/generate", {"model": loaded, "prompt": "", "keep_alive": 0})
        if stream.end < end + (end - start) + 0.1:
            raise RuntimeError("load gap: the stream ended before the control window did; raise its max_tokens")
        inside = _gaps(stream.arrivals, start, end)
        quiet = _gaps(stream.arrivals, end + 0.1, end + 0.1 + (end - start))
        baseline = median([b - a for a, b in zip(stream.arrivals, stream.arrivals[1:]) if b <= start or a >= end])
        during.append(max(inside) / baseline)
        control.append(max(quiet) / baseline)
        worst.append(max(inside) * 1e3)
        quiet_worst.append(max(quiet) * 1e3)
        typical.append(baseline * 1e3)
        loads.append(end - start)
    notes.append(
        f"load gap: loading a ~150 MB model took {', '.join(f'{s:.2f}' for s in loads)} s; worst gap per repetition "
        f"{', '.join(f'{w:.0f}' for w in worst)} ms against a median of {', '.join(f'{t:.1f}' for t in typical)} ms"
    )
    return [
        Row("while a 150 MB model loads: worst gap ÷ median gap", f"{median(worst):.0f} ms", f"median gap {median(typical):.1f} ms", median(during), "x", ("<=", 3.0)),
        Row("  (reference) same-length window, nothing loading", f"{median(quiet_worst):.0f} ms", f"median gap {median(typical):.1f} ms", median(control), "x", None),
    ]


# --- prompt cache: a second chat turn sharing a long prefix ------------------------------


def long_system(raw: RawModel, tag: str, tokens: int) -> str:
    """A system prompt of about `tokens` tokens that starts with a unique tag."""
    text = f"Session {tag}. "
    while len(raw.tokenizer.encode(text)) < tokens:
        text += FILLER
    ids = raw.tokenizer.encode(text)[:tokens]
    return raw.tokenizer.decode(ids)


async def _two_turns(http: aiohttp.ClientSession, target: Target, system: str, max_tokens: int) -> tuple[Stream, Stream]:
    first = [{"role": "system", "content": system}, {"role": "user", "content": "What does the reaper do?"}]
    turn1 = await stream_chat(http, target, first, max_tokens)
    second = first + [{"role": "assistant", "content": turn1.text}, {"role": "user", "content": "And when does it stop?"}]
    return turn1, await stream_chat(http, target, second, max_tokens)


async def prompt_cache(http: aiohttp.ClientSession, raw: RawModel, pair: Pair, prefix: int, max_tokens: int, reps: int, notes: list[str]) -> list[Row]:
    for side in (pair.daemon, pair.peer):
        await _two_turns(http, side, long_system(raw, "warm-up", prefix), max_tokens)
    turns: dict[str, list[tuple[Stream, Stream]]] = {pair.daemon.label: [], pair.peer.label: []}
    for rep in range(reps):
        system = long_system(raw, f"cache-{rep}", prefix)
        for side in pair.in_turn(rep):
            turns[side.label].append(await _two_turns(http, side, system, max_tokens))
    size = len(raw.prompt([{"role": "system", "content": long_system(raw, "cache-0", prefix)}]))
    notes.append(f"prompt cache: shared prefix {size} tokens, {max_tokens} tokens per answer")
    rows = []
    for side, target in ((pair.daemon, ("<=", 0.3)), (pair.peer, None)):
        first = median([t1.ttft for t1, _ in turns[side.label]]) * 1e3
        second = median([t2.ttft for _, t2 in turns[side.label]]) * 1e3
        ratio = median([t2.ttft / t1.ttft for t1, t2 in turns[side.label]])
        name = "second chat turn, 1,500-token shared prefix: TTFT ÷ first turn's"
        rows.append(Row(name if target else "  (reference) mlx_lm.server second turn ÷ first", f"{second:.1f} ms", f"first turn {first:.1f} ms", ratio, "x", target))
    return rows


# --- the prompt cache on disk, across a restart ---------------------------------------------


async def restart_cache(http: aiohttp.ClientSession, raw: RawModel, config: Path, logs: Path, model: str, prefix: int, max_tokens: int, reps: int, notes: list[str]) -> list[Row]:
    """A daemon that keeps prompt caches on disk answers a chat with a long system prompt
    cold; a new process then answers another chat sharing that system prompt (its TTFT
    against the cold one: both are the first request of a fresh process), and a third
    process the first chat again, whose answer must equal the cold one."""
    questions = ("What does the reaper do?", "What does the stream do?")
    cold, warm, same, loaded = [], [], 0, 0
    for rep in range(reps):
        system = long_system(raw, f"restart-{rep}", prefix)
        first, second = ([{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions)
        streams = []
        for process, chat in enumerate((first, second, first)):
            with DaemonProcess(config, log=logs / f"restart-{rep}-{process}.log") as daemon:
                daemon.wait_ready(model, timeout=300)
                streams.append(await stream_chat(http, Target("daemon", daemon.url, "ollama", model), chat, max_tokens))
                loaded += process > 0 and "disk prompt cache: loaded" in daemon.log_text()
        cold.append(streams[0])
        warm.append(streams[1])
        same += streams[2].text == streams[0].text
    notes.append(
        f"restart: after each restart the {prefix}-token system prompt came from disk in {loaded} of {2 * reps} first requests; "
        f"the first chat answered again by a new process equals its cold answer in {same} of {reps}; "
        f"TTFT cold (ms) {', '.join(f'{s.ttft * 1e3:.0f}' for s in cold)}, after the restart {', '.join(f'{s.ttft * 1e3:.0f}' for s in warm)}"
    )
    first_ms, second_ms = median([s.ttft for s in cold]) * 1e3, median([s.ttft for s in warm]) * 1e3
    ratio = median([w.ttft / c.ttft for c, w in zip(cold, warm)])
    return [Row("after a restart, 1,500-token shared prefix from disk: TTFT ÷ cold TTFT", f"{second_ms:.1f} ms", f"cold {first_ms:.1f} ms", ratio, "x", ("<=", 0.15))]


# --- a long prompt's prefill while another stream runs ------------------------------------


async def prefill_gap(http: aiohttp.ClientSession, raw: RawModel, pair: Pair, prefix: int, reps: int, notes: list[str]) -> list[Row]:
    """Not one of the issue's targets: a running stream's worst gap while a second
    request's long prompt is prefilled on the same model, against its median gap."""
    ratios: dict[str, list[float]] = {pair.daemon.label: [], pair.peer.label: []}
    worst: dict[str, list[float]] = {pair.daemon.label: [], pair.peer.label: []}
    typical: dict[str, list[float]] = {pair.daemon.label: [], pair.peer.label: []}
    (chat,) = steady_chats(raw, "prefill", 1, STEADY_TOKENS)
    for rep in range(reps):
        long = [{"role": "system", "content": long_system(raw, f"prefill-{rep}", prefix)}, {"role": "user", "content": "Hello?"}]
        for side in pair.in_turn(rep):
            stop = asyncio.Event()
            task = asyncio.create_task(stream_chat(http, side, chat, 3500, stop=stop))
            try:
                await asyncio.sleep(0.5)
                second = await stream_chat(http, side, long, 1)
                await asyncio.sleep(0.3)
            finally:
                stop.set()
            stream: Stream = await task
            start, end = second.sent, second.sent + second.ttft
            inside = max(_gaps(stream.arrivals, start, end))
            baseline = median([b - a for a, b in zip(stream.arrivals, stream.arrivals[1:]) if b <= start or a >= end])
            ratios[side.label].append(inside / baseline)
            worst[side.label].append(inside * 1e3)
            typical[side.label].append(baseline * 1e3)
    notes.append(
        f"prefill stall: a {prefix}-token prompt arrives while another stream on the same model runs; worst gap per repetition (ms) "
        + "; ".join(f"{label} {', '.join(f'{w:.0f}' for w in values)}" for label, values in worst.items())
    )
    return [
        Row(f"  (reference) {side.label}: worst gap while a 1,500-token prompt prefills ÷ median", f"{median(worst[side.label]):.0f} ms", f"median gap {median(typical[side.label]):.1f} ms", median(ratios[side.label]), "x", None)
        for side in (pair.daemon, pair.peer)
    ]


# --- startup -----------------------------------------------------------------------------


def startup(config: Path, peer_model: Path, logs: Path, reps: int) -> Row:
    """Popen -> first 200 of `GET /` (daemon) and of `/health` (mlx_lm.server)."""
    daemon, peer = [], []
    for _ in range(reps):
        started = time.perf_counter()
        process = DaemonProcess(config, log=logs / "startup-daemon.log")
        try:
            process.start()
            daemon.append(time.perf_counter() - started)
        finally:
            process.stop()
        with mlx_lm_server(peer_model, logs / "startup-mlx-lm.log") as (_, seconds):
            peer.append(seconds)
    d, p = median(daemon), median(peer)
    return Row("process start to GET / answering", f"{d:.2f} s", f"mlx_lm.server {p:.2f} s", d, "s", ("<=", 1.5))
