"""Prometheus for the metrics tests: the real binaries, installed when missing.

scripts/test.sh installs them first; a test run on its own tries the same script
(Debian's package via apt-get, or Homebrew) and skips only if that fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def require(tool: str) -> str:
    """The path of `prometheus` or `promtool`, installing them if needed."""
    if shutil.which(tool) is None:
        subprocess.run([str(ROOT / "scripts" / "install_prometheus.sh")], capture_output=True, timeout=600)
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed and scripts/install_prometheus.sh could not install it here")
    return path


def promtool_check(exposition: bytes) -> None:
    """`promtool check metrics`: the exposition parses and passes its lint rules."""
    result = subprocess.run([require("promtool"), "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def value(exposition: str, name: str, **labels: str) -> float:
    """The one sample `name` whose labels include `labels`."""
    found = [v for (n, ls), v in samples(exposition).items() if n == name and labels.items() <= dict(ls).items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]
