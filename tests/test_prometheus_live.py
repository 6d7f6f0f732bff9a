"""A real Prometheus scrapes a live daemon; promtool checks its exposition and the
scrape config README.md recommends."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request

import ollama
import pytest

from mlx_server.testing import free_port
from prometheus_tools import ROOT, promtool_check, require

pytestmark = pytest.mark.live


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus on loopback with a scrape config; returns (start(target) -> api url)."""
    binary = require("prometheus")
    started: list[subprocess.Popen] = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: mlx-server\n    static_configs:\n      - targets: ['{target}']\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")
        started.append(subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        ))
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(api: str, promql: str) -> list[dict]:
    url = f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def poll(api: str, promql: str, accept, timeout: float = 60) -> list[dict]:
    """Query until `accept(result)`; Prometheus needs a scrape or two."""
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        try:
            result = query(api, promql)
            if accept(result):
                return result
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{promql} never gave an acceptable result; last: {result}")


def test_prometheus_scrapes_the_daemon(daemon, test_model, prometheus):
    d = daemon([{"name": "demo", "source": str(test_model), "preload": True}])
    d.wait_ready("demo")
    reply = ollama.Client(host=d.url).generate(model="demo", prompt="hello", options={"temperature": 0, "num_predict": 7})
    api = prometheus(f"127.0.0.1:{d.port}")

    result = poll(api, "mlx_server_generated_tokens_total", lambda r: any(float(s["value"][1]) > 0 for s in r))
    tokens = {s["metric"]["model"]: float(s["value"][1]) for s in result}
    assert tokens == {"demo:latest": reply.eval_count}
    up = query(api, 'up{job="mlx-server"}')
    assert [float(s["value"][1]) for s in up] == [1.0]
    loaded = poll(api, 'mlx_server_model_loaded{model="demo:latest"}', bool)
    assert float(loaded[0]["value"][1]) == 1.0
    buckets = poll(api, 'mlx_server_request_duration_seconds_bucket{endpoint="/api/generate"}', bool)
    assert {s["metric"]["le"] for s in buckets} >= {"1.0", "60.0", "+Inf"}

    with urllib.request.urlopen(d.url + "/metrics", timeout=5) as r:
        promtool_check(r.read())


def test_readme_scrape_config_is_valid(tmp_path):
    """The example in README.md passes `promtool check config`."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```yaml\n(# prometheus\.yml\n.*?)```", readme, re.S)
    assert match, "README.md has no ```yaml block starting with '# prometheus.yml'"
    config = tmp_path / "prometheus.yml"
    config.write_text(match.group(1))
    result = subprocess.run([require("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11435" in match.group(1) and "/metrics" in match.group(1)
