"""The results table, the machine it ran on, and bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil


@dataclass(frozen=True, slots=True)
class Row:
    """One figure: the daemon's value, its peer's, and the number held against the target."""

    figure: str
    value: str
    peer: str
    result: float
    unit: str  # of `result`: "x" for a ratio, "ms", "s"
    target: tuple[str, float] | None  # (">=" | "<=", bound); None for a reference row

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target
        return self.result >= bound if op == ">=" else self.result <= bound

    def cells(self) -> list[str]:
        result = f"{self.result:.3f}" if self.unit == "x" else f"{self.result:.{1 if self.unit == 'ms' else 2}f} {self.unit}"
        if self.target is None:
            target, met = "reference", "-"
        else:
            op, bound = self.target
            target = f"{'≥' if op == '>=' else '≤'} {bound:g}{'' if self.unit == 'x' else ' ' + self.unit}"
            met = "yes" if self.met else "NO"
        return [self.figure, self.value, self.peer, result, target, met]


HEADER = ["figure", "daemon", "peer", "result", "target", "met?"]


def table(rows: list[Row]) -> str:
    """A Markdown table that also reads well in a terminal (padded columns)."""
    body = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cpu_model() -> str:
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return out.stdout.strip() or "unknown"


def machine() -> dict[str, str]:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx-lm": _version("mlx-lm"),
        "aiohttp": _version("aiohttp"),
        "commit": _commit(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
    }


def markdown(rows: list[Row], info: dict[str, str], notes: list[str], settings: str, note: str | None) -> str:
    met = [r.met for r in rows if r.met is not None]
    parts = ["# mlx-server benchmark results", ""]
    if note:
        parts += [note, ""]
    parts += [
        "Every figure is a ratio (or difference) against a peer measured in the same run, on",
        "the same machine, with the same client code: absolute numbers move with the machine's",
        "load, the ratios much less. Each repetition measures the daemon and its peer back to",
        "back; `result` is the median of the per-repetition ratios (for alternating models: the",
        "ratio of median request durations), so it can differ from the ratio of the two medians",
        "shown beside it. Rows marked (reference) have no target.",
        "Produced by `.venv/bin/python bench/run.py`; bench/figures.py says what each figure measures.",
        "",
        f"Targets met: {sum(met)} of {len(met)}. Settings: {settings}.",
        "",
        table(rows),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Notes from the run",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    return "\n".join(parts)
