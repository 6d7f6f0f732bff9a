"""ops/grafana/mlx-server.json and ops/prometheus/alerts.yml name only metrics that a
live daemon exports, so neither rots when a metric is renamed; promtool parses every
expression of the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import ollama
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_tools import ROOT, require

from mlx_server.testing import ready_daemon

DASHBOARD = ROOT / "ops" / "grafana" / "mlx-server.json"
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
PROMETHEUS_OWN = {"up"}  # written by Prometheus itself for every target
NODE_EXPORTER = {"node_filesystem_avail_bytes", "node_filesystem_size_bytes"}  # the disk-volume alert's
# Grafana's variables, as promtool would see them.
VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}
# The sample names a family of each type has once it has series (counters: `_total`). A
# `_created` stamp counts only where a sample shows it (the restart alert reads one).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}

# --- metric names in PromQL --------------------------------------------------------------

STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
TOKEN = re.compile(r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)|(?P<name>[a-zA-Z_:][\w:]*)(?P<call>\s*\()?")
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers,
    ranges, grouping labels, Grafana variables, functions, keywords and numbers are gone."""
    assert "__name__" not in expr, f"selects by __name__, which this parser does not read: {expr}"
    expr = STRINGS.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # no brace or bracket is left inside them, strings gone
    expr = re.sub(r"\$\{?\w+\}?", "0", GROUPING.sub(" ", expr))
    return {m["name"] for m in TOKEN.finditer(expr) if m["name"] and not m["call"] and m["name"].lower() not in KEYWORDS}


def test_metric_names_leave_out_everything_but_metrics():
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"x|y}", le!="+Inf"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert metric_names('sum without (instance) (b) / ignoring (le) group_left (model) c offset 1h > bool 1e3') == {"b", "c"}
    assert metric_names('d and on (job) e unless f or label_replace(g, "h", "$1", "i", "(.*)") + vector(1) * 0x1f') == {"d", "e", "f", "g"}
    assert metric_names('max_over_time(j[1h:5m]) > inf') == {"j"}


# --- what the daemon exports ------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, test_model) -> set[str]:
    """Every sample name a live daemon's /metrics has or would have once its series exist."""
    models = [{"name": "demo", "source": str(test_model), "preload": True, "keep_alive": -1}]
    with ready_daemon(tmp_path_factory.mktemp("ops"), models) as daemon:
        ollama.Client(host=daemon.url).generate(model="demo", prompt="hi", options={"num_predict": 2})
        with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as r:
            exposition = r.read().decode()
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and the instance variable's query."""
    board = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, label)
            found.append((f"${variable['name']}", re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"]).group(1)))
    return found


def unknown(expressions: list[tuple[str, str]], known: set[str]) -> dict[str, set[str]]:
    return {f"{where}: {expr}": names - known for where, expr in expressions if (names := metric_names(expr)) - known or not names}


@pytest.mark.live
def test_every_dashboard_expression_names_exported_metrics(exported):
    expressions = dashboard_expressions()
    assert unknown(expressions, exported | PROMETHEUS_OWN) == {}
    used = set().union(*(metric_names(e) for _, e in expressions))
    # what the dashboard is for: the ledger, tokens/s, TTFT and queue waits, queues, unloads
    assert {
        "mlx_server_model_memory_bytes", "mlx_server_kv_cache_bytes", "mlx_server_memory_reserved_bytes",
        "mlx_server_generated_tokens_total", "mlx_server_time_to_first_token_seconds_bucket",
        "mlx_server_queue_wait_seconds_bucket", "mlx_server_queue_depth", "mlx_server_model_evictions_total",
    } <= used


@pytest.mark.live
def test_every_alert_names_exported_metrics(exported):
    rules = [(r["alert"], r["expr"]) for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert unknown(rules, exported | PROMETHEUS_OWN | NODE_EXPORTER) == {}


def test_promtool_parses_every_dashboard_expression(tmp_path):
    """As recording rules, with Grafana's variables filled in."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_expressions()):
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([require("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_imports_cleanly():
    """Unique panel ids, one Prometheus data source chosen on import, every target named."""
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"]), panel["title"]
