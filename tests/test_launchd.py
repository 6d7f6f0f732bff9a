"""The LaunchAgent: scripts/install_launchd.sh renders launchd/mlx-server.plist.in with
real, escaped paths and a checked config; plistlib (and plutil on macOS) read it back."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_server.testing import write_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install_launchd.sh"


@pytest.fixture
def odd_home(tmp_path, test_model) -> tuple[Path, Path]:
    """A HOME and a models.yaml whose paths need XML escaping: & < > ' and spaces."""
    home = tmp_path / "home & <co> 'x'"
    home.mkdir()
    config = write_config(home / "my models.yaml", [{"name": "demo", "source": str(test_model)}], server={"shutdown_grace": "90s"})
    return home, config


def run(*args: str, home: Path, config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "MLX_SERVER_CONFIG": str(config)}
    return subprocess.run([str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_dry_run_renders_a_valid_plist_with_real_paths(odd_home, tmp_path):
    home, config = odd_home
    result = run("--dry-run", home=home, config=config, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plist = plistlib.loads(result.stdout.encode())

    program = Path(plist["ProgramArguments"][0])
    assert program == ROOT / ".venv" / "bin" / "mlx-server" and program.is_file() and os.access(program, os.X_OK)
    assert plist["ProgramArguments"][1:] == ["serve"]
    assert plist["Label"] == "local.mlx-server"
    assert plist["WorkingDirectory"] == str(ROOT)
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart after a crash, not after a clean stop
    assert 5 <= plist["ThrottleInterval"] <= 60
    assert plist["ProcessType"] in ("Interactive", "Background")
    assert plist["ExitTimeOut"] > 90  # longer than server.shutdown_grace, or launchd kills running streams
    env = plist["EnvironmentVariables"]
    assert env["MLX_SERVER_CONFIG"] == str(config)
    assert env["PATH"].split(":")[0] == str(ROOT / ".venv" / "bin")
    logs = home / "Library" / "Logs" / "mlx-server"
    assert Path(plist["StandardOutPath"]).parent == logs
    assert Path(plist["StandardErrorPath"]).parent == logs
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 1024
    assert not (home / "Library" / "LaunchAgents").exists(), "--dry-run must not install anything"


def test_a_broken_config_is_refused_before_installing(odd_home, tmp_path):
    home, config = odd_home
    config.write_text("server:\n  port: eleven\nmodels: []\n")
    result = run("--dry-run", home=home, config=config, cwd=tmp_path)
    assert result.returncode != 0
    assert "port" in result.stderr and str(config) in result.stderr


@pytest.mark.skipif(sys.platform != "darwin", reason="plutil is part of macOS")
def test_plutil_lints_the_rendered_plist(odd_home, tmp_path):
    home, config = odd_home
    result = run("--dry-run", home=home, config=config, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    file = tmp_path / "rendered.plist"
    file.write_text(result.stdout)
    lint = subprocess.run(["plutil", "-lint", str(file)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.skipif(shutil.which("launchctl") is not None, reason="launchctl is here: this would install a real service")
def test_install_without_launchd_says_why(odd_home, tmp_path):
    home, config = odd_home
    for args in ((), ("--uninstall",)):
        result = run(*args, home=home, config=config, cwd=tmp_path)
        assert result.returncode == 1
        assert "macOS only" in result.stderr and "--dry-run" in result.stderr
