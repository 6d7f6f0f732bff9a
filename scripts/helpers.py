"""The Python half of the shell scripts (lib.sh calls it): checks that are awkward in bash.

    helpers.py installed ROOT [EXTRA...]     exit 0 if the venv runs ROOT's package with every requirement met
    helpers.py config CONFIG                 print "host port shutdown_grace" (validates models.yaml)
    helpers.py port-free HOST PORT [OWN]     exit 1, naming the holder, if something but OWN listens there
    helpers.py wait URL PID TIMEOUT SETTLE   wait for /health, then up to SETTLE s for loads to end
    helpers.py render-plist TEMPLATE ...     the LaunchAgent plist with real paths, checked

`installed` needs only the standard library (it runs before the package may be there).
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
import urllib.request
from pathlib import Path


def installed(root: Path, extras: list[str]) -> int:
    """0 when `import mlx_server` is this checkout's and pyproject's requirements are met."""
    import importlib.metadata as metadata
    import importlib.util
    import tomllib

    spec = importlib.util.find_spec("mlx_server")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != (root / "mlx_server").resolve():
        print("mlx_server is not installed from", root)
        return 1
    try:
        from packaging.requirements import Requirement
    except ImportError:
        print("packaging is missing")
        return 1
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    missing = []
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{line} (have {version})")
    if missing:
        print("missing:", "; ".join(missing))
        return 1
    return 0


def config(path: str) -> int:
    from mlx_server.config import ConfigError, load_config

    try:
        server = load_config(path).server
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(server.host, server.port, server.shutdown_grace)
    return 0


def port_free(host: str, port: int, own: int | None) -> int:
    """Free means: nothing answers on it and we could listen on it ourselves, or
    what holds it is `own` (the daemon the caller is about to replace)."""
    from mlx_server.cli import listening_pids, port_holder

    probe = "127.0.0.1" if host in ("0.0.0.0", "", "*") else "::1" if host == "::" else host
    held = False
    try:
        with socket.create_connection((probe, port), timeout=1):
            held = True
    except OSError:
        pass
    if not held:
        try:
            socket.create_server((host, port)).close()  # SO_REUSEADDR, like the daemon
        except OSError:
            held = True
    if not held or (own and listening_pids(port) == [own]):
        return 0
    holder = port_holder(port)
    print(f"error: port {port} on {host} is already in use by {holder or 'another program'}.", file=sys.stderr)
    if holder is None:
        print(f"  This user cannot see which program; try: sudo lsof -nP -iTCP:{port} -sTCP:LISTEN", file=sys.stderr)
    elif "mlx-server" in holder or "mlx_server" in holder:
        print("  It is an mlx-server this script did not start: the launchd service? Stop it with\n"
              "  scripts/install_launchd.sh --uninstall, or talk to it as it is.", file=sys.stderr)
    else:
        print("  Stop that program, or give mlx-server another port (server.port in models.yaml, "
              "or MLX_SERVER_PORT).", file=sys.stderr)
    return 1


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


USABLE = ("healthy", "degraded")  # /health's statuses; `degraded`: a model failed, the others serve


def wait(url: str, pid: int, timeout: float, settle: float) -> int:
    """Until /health answers `healthy` or `degraded` (1 if the daemon dies first; pid 0:
    launchd's, not watched), then until no model is loading; a degraded daemon is named."""
    deadline = time.monotonic() + timeout
    while True:
        if pid and not _alive(pid):
            print(f"error: mlx-server (pid {pid}) exited while starting", file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r).get("status") not in USABLE:
                    raise ValueError("not mlx-server's /health")
            break
        except (OSError, ValueError, AttributeError):
            if time.monotonic() > deadline:
                print(f"error: mlx-server (pid {pid}) did not answer on {url}/health within {timeout:g}s", file=sys.stderr)
                return 1
            time.sleep(0.25)
    deadline = time.monotonic() + settle
    report: dict = {}
    while time.monotonic() < deadline and (not pid or _alive(pid)):
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                report = json.load(r)
            if not any(m["state"] == "loading" for m in report["models"]):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    if report.get("status") == "degraded":
        failed = [f"{m['name']} ({m.get('error', 'failed')})" for m in report.get("models", []) if m.get("state") == "failed"]
        print(f"warning: mlx-server is degraded: {', '.join(failed) or 'the engine is down'}", file=sys.stderr)
    return 0


def render_plist(template: Path, values: dict[str, str], config_path: str) -> int:
    """Fill the template (XML-escaped), then parse it back to prove it is a valid plist."""
    import plistlib
    from string import Template
    from xml.sax.saxutils import escape

    from mlx_server.config import ConfigError, load_config

    try:
        grace = load_config(config_path).server.shutdown_grace
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    values = {**values, "config": config_path, "exit_timeout": str(math.ceil(grace) + 15)}
    text = Template(template.read_text()).substitute({k: escape(v) for k, v in values.items()})
    plist = plistlib.loads(text.encode())
    if plist["ProgramArguments"][0] != values["program"]:
        raise SystemExit("error: rendered plist does not name the program")
    sys.stdout.write(text)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="helpers.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("installed")
    p.add_argument("root", type=Path)
    p.add_argument("extras", nargs="*")
    sub.add_parser("config").add_argument("path")
    p = sub.add_parser("port-free")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("own", type=int, nargs="?")
    p = sub.add_parser("wait")
    p.add_argument("url")
    p.add_argument("pid", type=int)
    p.add_argument("timeout", type=float)
    p.add_argument("settle", type=float)
    p = sub.add_parser("render-plist")
    p.add_argument("template", type=Path)
    for key in ("label", "program", "config", "root", "log_dir", "path"):
        p.add_argument(f"--{key.replace('_', '-')}", required=True)
    args = parser.parse_args(argv)
    if args.command == "installed":
        return installed(args.root, args.extras)
    if args.command == "config":
        return config(args.path)
    if args.command == "port-free":
        return port_free(args.host, args.port, args.own)
    if args.command == "wait":
        return wait(args.url.rstrip("/"), args.pid, args.timeout, args.settle)
    values = {k: getattr(args, k) for k in ("label", "program", "root", "log_dir", "path")}
    return render_plist(args.template, values, args.config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
