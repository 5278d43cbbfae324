"""The `nudge` command's tools, as a user calls them."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from engine.cli import main
from tests.conftest import ROOT

WRITE = ("dev-write-key", "")


def test_lint_of_the_shipped_config_is_clean(capsys: pytest.CaptureFixture) -> None:
    assert main(["lint", str(ROOT / "config.toml")]) == 0
    assert "0 error(s)" in capsys.readouterr().out


def test_simulate_checks_a_scenario(capsys: pytest.CaptureFixture) -> None:
    scenario = ROOT / "tests" / "scenarios" / "cart_abandonment.toml"
    assert main(["simulate", str(scenario), "--check"]) == 0
    assert "cart_abandonment#1" in capsys.readouterr().out


def test_explain_asks_the_running_engine(local_api, capsys: pytest.CaptureFixture) -> None:
    base, _ = local_api
    httpx.post(f"{base}/v1/track", auth=WRITE, json={"userId": "zed", "event": "Product Viewed"})
    assert main(["explain", "zed", "--url", base, "--key", "dev-admin-key"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("customer zed")
    assert main(["explain", "nobody", "--url", base, "--key", "dev-admin-key"]) == 2
    assert "no customer" in capsys.readouterr().err


def test_bad_config_is_reported_not_raised(tmp_path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("[engine]\nshards = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "config", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "engine.shards" in done.stderr and "Traceback" not in done.stderr
