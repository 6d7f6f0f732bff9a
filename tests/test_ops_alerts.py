"""ops/prometheus/alerts.yml passes promtool, and its unit tests (alerts.test.yml) fire
every alert on some series and keep it quiet on others."""

from __future__ import annotations

import re
import subprocess

import yaml
from conftest import make_config
from prometheus_tools import ROOT, require

RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
UNIT_TESTS = ROOT / "ops" / "prometheus" / "alerts.test.yml"


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}


def test_the_rules_pass_promtool_check():
    result = subprocess.run([require("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = subprocess.run([require("promtool"), "test", "rules", str(UNIT_TESTS)], capture_output=True, text=True, timeout=120, cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet():
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fired == set(), "alerts no unit test fires"
    assert names - quiet == set(), "alerts no unit test keeps quiet"
    assert (fired | quiet) - names == set(), "unit tests of alerts that do not exist"


def test_the_queue_alert_matches_the_default_max_queue():
    """Prometheus cannot read models.yaml: the threshold is written out, 0.8 × max_queue."""
    rule = alerts()["MlxServerQueueNearFull"]
    max_queue = make_config([]).server.max_queue
    assert re.search(r"> (\d+)$", rule["expr"].strip()).group(1) == str(int(0.8 * max_queue))
    assert f"of {max_queue}" in rule["annotations"]["summary"]
