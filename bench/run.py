"""Benchmark mlx-server against raw mlx_lm and mlx_lm.server, all in one run.

    .venv/bin/python bench/run.py [--quick] [--out bench/RESULTS.md] [--only one,c8,...]
                                  [--api ollama|openai] [--model random|real] [--note TEXT]

Creates random-weight test models in a temporary directory (with `--model real`,
the one-model figures run on the real demo model, SmolLM2-135M-Instruct, built once
into .cache/; the big random models stay for the load and switch figures), starts the daemon
(`mlx-server serve`) and `mlx_lm.server` on free loopback ports, streams to both
with one aiohttp client, prints a table of ratios against peers measured in the
same run and writes it, with the machine, to RESULTS.md. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import figures
from peers import load_raw, mlx_lm_server
from report import Row, machine, markdown, table
from streams import Target, session

from mlx_server.testing import DaemonProcess, demo_model, make_test_model, write_config

CACHE = Path(__file__).resolve().parents[1] / ".cache"  # where tests keep the real model too

MAX_TOKENS = 64  # per stream, as in the issue
SWAP_TOKENS = 8  # per request on the ~150 MB models (about 20 tokens/s on a CPU)
CACHE_PREFIX = 1500  # tokens shared by both turns of the prompt-cache chat
CACHE_TOKENS = 16
SMALL = {"hidden": 256, "layers": 4}  # ~2.5M parameters, ~10 MB
BIG = {"hidden": 1024, "layers": 4}  # ~38M parameters, ~155 MB in float32
FIGURES = ("one", "c8", "c32", "cache", "restart", "prefill", "gap", "alternating", "startup")


@dataclass(frozen=True, slots=True)
class Plan:
    """Repetitions per figure (each rep measures the daemon and its peer)."""

    one: int
    concurrency: int
    cache: int
    gap: int
    alternating: int
    alternating_requests: int
    startup: int
    restart: int


QUICK = Plan(one=6, concurrency=2, cache=2, gap=2, alternating=2, alternating_requests=4, startup=2, restart=1)
FULL = Plan(one=20, concurrency=6, cache=5, gap=6, alternating=5, alternating_requests=6, startup=5, restart=3)


def make_models(root: Path, real: bool) -> dict[str, Path]:
    return {
        "small": demo_model(CACHE) if real else make_test_model(root / "small", **SMALL),
        "big-a": make_test_model(root / "big-a", **BIG, seed=1),
        "big-b": make_test_model(root / "big-b", **BIG, seed=2),
        "big-c": make_test_model(root / "big-c", **BIG, seed=3),
    }


def daemon_config(root: Path, models: dict[str, Path]) -> Path:
    """small and two big models resident from the start; big-c is loaded by the gap figure."""
    entries = [
        {"name": name, "source": str(path), "preload": name != "big-c", "keep_alive": -1, "max_concurrency": 32}
        for name, path in models.items()
    ]
    return write_config(root / "models.yaml", entries, defaults={"keep_alive": -1, "options": {"temperature": 0}})


async def measure_http(daemon: DaemonProcess, peer_url: str, models: dict[str, Path], api: str, real: bool, plan: Plan, only: set[str], notes: list[str]) -> list[Row]:
    raw = load_raw(models["small"], real=real)

    def pair(name: str) -> figures.Pair:
        return figures.Pair(Target("daemon", daemon.url, api, name), Target("mlx_lm.server", peer_url, "openai", str(models[name])))

    small = pair("small")
    rows: list[Row] = []
    loads = []
    async with session() as http:
        steps = {
            "one": lambda: figures.one_stream(http, raw, small, MAX_TOKENS, plan.one, notes),
            "c8": lambda: figures.concurrency(http, raw, small, 8, MAX_TOKENS, plan.concurrency, 1.0, notes),
            "c32": lambda: figures.concurrency(http, raw, small, 32, MAX_TOKENS, plan.concurrency, 1.1, notes),
            "cache": lambda: figures.prompt_cache(http, raw, small, CACHE_PREFIX, CACHE_TOKENS, plan.cache, notes),
            "prefill": lambda: figures.prefill_gap(http, raw, small, CACHE_PREFIX, plan.cache, notes),
            "gap": lambda: figures.load_gap(http, raw, small.daemon, daemon.url, "big-c", plan.gap, notes),
            # last: it leaves mlx_lm.server holding a big model
            "alternating": lambda: figures.alternating(http, pair("big-a"), pair("big-b"), plan.alternating_requests, SWAP_TOKENS, plan.alternating, notes),
        }
        for name, step in steps.items():
            if name in only:
                rows += await step()
                loads.append(f"{name} {os.getloadavg()[0]:.1f}")
    notes.append(f"1-minute load average of the machine after each figure ({os.cpu_count()} cores: {os.cpu_count()}.0 is full): {', '.join(loads)}")
    return rows


def measure(root: Path, api: str, real: bool, plan: Plan, only: set[str], notes: list[str]) -> list[Row]:
    models = make_models(root, real)
    config = daemon_config(root, models)
    rows: list[Row] = []
    if only - {"startup", "restart"}:
        with ExitStack() as stack:
            daemon = stack.enter_context(DaemonProcess(config, log=root / "daemon.log"))
            for name, path in models.items():
                if name != "big-c":
                    daemon.wait_ready(name, timeout=120)
            peer_url, _ = stack.enter_context(mlx_lm_server(models["small"], root / "mlx-lm.log"))
            rows += asyncio.run(measure_http(daemon, peer_url, models, api, real, plan, only, notes))
    if "restart" in only:
        rows += asyncio.run(measure_restart(root, models["small"], real, plan, notes))
    if "startup" in only:
        rows.append(figures.startup(config, models["small"], root, plan.startup))
    return rows


async def measure_restart(root: Path, model: Path, real: bool, plan: Plan, notes: list[str]) -> list[Row]:
    """On a daemon of its own, serving only the small model, with the disk prompt cache on."""
    config = write_config(
        root / "restart.yaml",
        [{"name": "small", "source": str(model), "preload": True}],
        defaults={"keep_alive": -1, "options": {"temperature": 0}},
        memory={"disk_cache_gb": 1, "disk_cache_dir": str(root / "disk-cache")},
    )
    async with session() as http:
        return await figures.restart_cache(http, load_raw(model, real=real), config, root, "small", CACHE_PREFIX, CACHE_TOKENS, plan.restart, notes)


def print_logs(root: Path, lines: int = 40) -> None:
    for log in sorted(root.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last {len(tail)} lines of {log.name} ---", *tail, sep="\n", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a few minutes")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md", help="where to write the Markdown results")
    parser.add_argument("--api", choices=("ollama", "openai"), default="ollama", help="the daemon route to stream from: /api/chat (NDJSON) or /v1/chat/completions (SSE)")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--model", choices=("random", "real"), default="random",
                        help="the one-model figures' model: the random test model (fast, big batches) or the real demo model")
    parser.add_argument("--note", help="a line to put at the top of RESULTS.md")
    args = parser.parse_args(argv)
    only = {f.strip() for f in args.only.split(",") if f.strip()}
    if not only or only - set(FIGURES):
        parser.error(f"--only takes names from {','.join(FIGURES)}; got {args.only!r}")
    plan = QUICK if args.quick else FULL
    info = machine()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mlx-bench-") as tmp:
        try:
            rows = measure(Path(tmp), args.api, args.model == "real", plan, only, notes)
        except BaseException:
            print_logs(Path(tmp))
            raise
    info["load average (1 min) at end"] = f"{os.getloadavg()[0]:.2f}"
    settings = f"{'--quick' if args.quick else 'full'} run, {args.model} model, daemon route {'/api/chat' if args.api == 'ollama' else '/v1/chat/completions'}, {plan}"
    print(table(rows))
    print(*notes, sep="\n")
    args.out.write_text(markdown(rows, info, notes, settings, args.note))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
