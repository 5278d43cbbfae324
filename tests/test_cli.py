"""The `nudge` command's tools, as a user calls them."""

from __future__ import annotations

import subprocess
import sys
import time

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


def _serve_args(**given: object):
    import argparse

    names = ("config", "host", "port", "workers", "data_dir", "shards", "redis_url", "ray_address")
    return argparse.Namespace(**{name: given.get(name) for name in names})


def test_serve_flags_replace_what_the_file_and_environment_say_before_the_checks(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The flags were applied after the file and environment had been checked: a
    # --host could not fix a public host with the dev keys, nor --port the
    # NUDGE_PORT=tcp://... that Kubernetes sets for a Service named nudge.
    from engine.cli import _serve_config
    from engine.errors import ConfigError

    public = tmp_path / "public.toml"
    public.write_text('[server]\nhost = "0.0.0.0"\n')
    monkeypatch.setenv("NUDGE_PORT", "tcp://10.0.0.7:8000")
    with pytest.raises(ConfigError):
        _serve_config(_serve_args(config=str(public), port=9000))  # the file's host stands
    config = _serve_config(_serve_args(config=str(public), host="127.0.0.1", port=9000))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)
    with pytest.raises(ConfigError) as caught:
        _serve_config(_serve_args(host="127.0.0.1", port=9000, shards=0))
    assert caught.value.field == "engine.shards"


@pytest.mark.parametrize("make", ["directory", "latin-1"])
def test_an_unreadable_config_file_is_a_clear_error(tmp_path, make: str) -> None:
    path = tmp_path / "config.toml"
    if make == "directory":
        path.mkdir()
    else:
        path.write_bytes('[server]\nhost = "café"\n'.encode("latin-1"))
    done = subprocess.run(
        [sys.executable, "-m", "engine", "config", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(path) in done.stderr


def test_lint_checks_the_rules_nudge_serve_would_run(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # It read ./config.toml only: with NUDGE_CONFIG naming the config (as the README
    # says it may), or with no config at all (the starter rules), it failed.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NUDGE_CONFIG", raising=False)
    assert main(["lint"]) == 0
    assert "error(s)" in capsys.readouterr().out  # the starter rules, checked
    own = tmp_path / "elsewhere.toml"
    own.write_text('[[rule]]\nname = "r"\non = "Product Added"\n[[rule.step]]\nwait = "soon"\n')
    monkeypatch.setenv("NUDGE_CONFIG", str(own))
    assert main(["lint"]) == 2
    assert "elsewhere.toml" in capsys.readouterr().err


def test_commands_say_what_went_wrong_when_the_engine_is_not_there(tmp_path) -> None:
    # A plain web server (or a proxy's error page) answering, and a Redis that is
    # not there: each was a traceback (orjson.JSONDecodeError, ConnectionError).
    import http.server
    import threading

    class NotNudge(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>Bad gateway</html>" if "explain" in self.path else b"hello"
            self.send_response(502 if "explain" in self.path else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # JSON, but not Nudge's answer
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    products = tmp_path / "products.csv"
    products.write_text("id,name,price\nsku-1,Socks,9.5\n")
    server = http.server.HTTPServer(("127.0.0.1", 0), NotNudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        runs = {
            "explain": ["explain", "ann", "--url", url],
            "dlq": ["dlq", "--url", url, "list"],
            "dlq redis": ["dlq", "--redis-url", "redis://127.0.0.1:1/0", "list"],
            "dlq no url": ["dlq", "--redis-url", "127.0.0.1:6379", "list"],
            "catalog": ["catalog", "import", str(products), "--url", url],
        }
        for name, argv in runs.items():
            done = subprocess.run(
                [sys.executable, "-m", "engine", *argv], capture_output=True, text=True, cwd=ROOT
            )
            assert done.returncode == 2, (name, done.stderr)
            assert "Traceback" not in done.stderr and done.stderr.startswith("nudge "), name
    finally:
        server.shutdown()


def test_serve_with_a_redis_that_does_not_answer_stops_at_once_naming_it(tmp_path) -> None:
    # The shards retried their recovery for a minute, then a TimeoutError traceback.
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--redis-url", "redis://127.0.0.1:1/0",
         "--data-dir", str(tmp_path / "data"), "--port", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in done.stderr
    assert time.monotonic() - started < 30
