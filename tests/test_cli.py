"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_info_json():
    out = subprocess.run([sys.executable, "-m", "rcengine.cli.app", "info", "--json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["packages"]["torch"] != "not installed"
    assert {"cpu", "disk"} <= set(report["tiers"])
    assert report["tiers"]["cpu"]["available"] is True


def test_unknown_command_exits_2():
    out = subprocess.run([sys.executable, "-m", "rcengine.cli.app", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
