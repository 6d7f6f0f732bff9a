"""Schemathesis against a live daemon, driven by the daemon's own GET /openapi.json.

Every documented operation gets examples, boundary cases and fuzzed bodies (valid
and invalid); no answer may be a 5xx, and each must match the documented status
codes, content types, headers and response schemas. Bounded: a few examples per
operation and phase. It runs as the `st` command line: its pytest loader for a
schema from a fixture reads a node attribute that pytest 9 removed.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mlx_server.testing import ready_daemon

pytestmark = pytest.mark.live

CONTEXT = 64  # tokens: a fuzzed request that generates stops within a fraction of a second
EXAMPLES = 10  # per operation and phase
OPERATIONS = 27
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance", "response_schema_conformance")


@pytest.fixture(scope="module")
def live(tmp_path_factory, test_model):
    models = [{"name": "demo", "source": str(test_model), "preload": True, "pinned": True, "keep_alive": -1, "context_length": CONTEXT, "max_concurrency": 4}]
    with ready_daemon(tmp_path_factory.mktemp("schemathesis"), models) as daemon:
        yield daemon


def aimed(document: dict) -> dict:
    """The served document, with `model` narrowed to the configured one (and one unknown
    name) so fuzzed requests reach the model instead of stopping at a 404. The routes
    that always answer 501 (models.yaml manages models; tests/test_client_fixes.py)
    are left out: schemathesis counts every 5xx as a server error."""
    document = copy.deepcopy(document)
    document["paths"] = {p: ops for p, ops in document["paths"].items() if not any("501" in op["responses"] for op in ops.values())}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            for schema in [body] + [p["schema"] for p in operation.get("parameters", [])]:
                properties = schema.get("properties", schema) if schema else {}
                for key in ("model", "name"):
                    if isinstance(properties.get(key), dict) and properties[key].get("type") == "string":
                        properties[key] = {"enum": ["demo", "demo:latest", "not-configured"]}
                if schema is not None and schema.get("type") == "string" and path == "/v1/models/{model}":
                    schema["enum"] = ["demo:latest", "not-configured"]
    return document


def test_every_operation_holds_to_its_document(live, tmp_path):
    """`st run` (the schemathesis CLI) over examples, boundary cases and fuzzing."""
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(aimed(httpx.get(live.url + "/openapi.json", timeout=10).json())))
    started = time.monotonic()
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")), "run", str(document), "--url", live.url,
            "--checks", ",".join(CHECKS), "--mode", "all", "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(EXAMPLES), "--seed", "1", "--workers", "2", "--request-timeout", "60",
            "--generation-database", "none", "--suppress-health-check", "all", "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    if run.returncode != 0:
        pytest.fail(f"schemathesis found problems:\n{run.stdout[-15000:]}\n{run.stderr[-3000:]}", pytrace=False)
    summary = run.stdout[run.stdout.rindex("SUMMARY"):]
    assert f"Selected: {OPERATIONS}/{OPERATIONS}" in summary and f"Tested: {OPERATIONS}" in summary, summary
    tested = int(re.search(r"(\d+) generated", summary).group(1))
    assert tested > 500, summary  # hundreds of requests, in about a minute
    assert time.monotonic() - started < 240
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "healthy" and health["models"][0]["active_requests"] == 0 and health["queue_depth"] == 0


def test_the_document_covers_every_route_and_marks_the_public_ones(live):
    from mlx_server.api.middlewares import PUBLIC_PATHS
    from mlx_server.app import create_app
    from mlx_server.config import parse_config

    document = httpx.get(live.url + "/openapi.json").json()
    app = create_app(parse_config({"models": []}))
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.method != "HEAD" or r.resource.canonical == "/"}
    assert routes == {(path, method) for path, operations in document["paths"].items() for method in operations}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == (path in PUBLIC_PATHS), path  # [] = no key needed
    assert document["security"] and set(document["components"]["securitySchemes"]) == {"bearer", "x-api-key"}
