"""The local Hub under hostile requests and careless start-up: answers 4xx (never 500), sheds slow
bodies, keeps a bounded request log, and `hub serve` names what is wrong with its options.

Every server here listens on 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from hf_metagpt.localhub import Limits, LocalHub

TOKEN = "hf_hardening3_token"
USER = "hana"
NESTED = b"[" * 100_000


def _host(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def _raw(endpoint: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*_host(endpoint), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp("h3hub") / "data", tokens={TOKEN: USER}) as running:
        api = HfApi(endpoint=running.endpoint, token=TOKEN)
        api.create_repo(f"{USER}/m")
        yield running


# ------------------------------------------------------------------ nested JSON: 400 on every JSON route

JSON_ROUTES = {
    "validate-yaml": ("POST", "/api/validate-yaml", {"Content-Type": "application/json"}),
    "paths-info": ("POST", f"/api/models/{USER}/m/paths-info/main", {"Content-Type": "application/json"}),
    "lfs-batch": ("POST", f"/{USER}/m.git/info/lfs/objects/batch", {"Content-Type": "application/vnd.git-lfs+json"}),
    "repos-create": ("POST", "/api/repos/create", {"Content-Type": "application/json"}),
    "commit": ("POST", f"/api/models/{USER}/m/commit/main", {"Content-Type": "application/x-ndjson"}),
    "preupload": ("POST", f"/api/models/{USER}/m/preupload/main", {"Content-Type": "application/json"}),
    "lfs-verify": ("POST", f"/{USER}/m.git/info/lfs/objects/verify", {"Content-Type": "application/json"}),
}


@pytest.mark.parametrize("route", sorted(JSON_ROUTES))
def test_deeply_nested_json_body_is_answered_400(hub, route):
    method, path, headers = JSON_ROUTES[route]
    status, body = _raw(hub.endpoint, method, path, NESTED, headers)
    assert status == 400, body
    assert "nested too deeply" in json.loads(body)["error"]
    assert _raw(hub.endpoint, "GET", "/api/whoami-v2")[0] == 200  # and the server is fine


@pytest.mark.parametrize("index", [b"[1, 2, 3]", b"\xff\xfe not utf-8", b'{"weight_map": ["a"]}',
                                   b'{"weight_map": {"t": 5}}', b"[" * 100_000],
                         ids=["list", "not-utf8", "weight-map-list", "weight-map-number", "nested"])
def test_safetensors_metadata_with_an_index_that_is_not_an_object_is_answered_400(hub, index):
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    repo = f"{USER}/badindex"
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, [CommitOperationAdd("model.safetensors.index.json", index)], commit_message="bad")
    status, body = _raw(hub.endpoint, "GET", f"/api/models/{repo}/safetensors-metadata/model.safetensors.index.json")
    assert status == 400, body
    assert "model.safetensors.index.json" in json.loads(body)["error"]


# ------------------------------------------------------------------ slow bodies, per-client cap, request log

def _slow_body(endpoint: str) -> socket.socket:
    s = socket.create_connection(_host(endpoint), timeout=5)
    s.sendall(b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000000\r\n\r\n[")
    return s


def test_slow_request_bodies_are_cut_off_and_other_clients_get_through(tmp_path):
    limits = Limits(max_connections=8, body_grace=1.0, min_body_rate=1000, body_timeout=60)
    with LocalHub(tmp_path / "data", tokens={TOKEN: USER}, limits=limits) as hub:
        slow = [_slow_body(hub.endpoint) for _ in range(8)]
        start = time.monotonic()
        status = None
        while time.monotonic() - start < 15:
            for s in slow:  # a byte every 0.3 s: each read comes well within body_timeout
                try:
                    s.sendall(b"1")
                except OSError:
                    pass
            status = _raw(hub.endpoint, "GET", "/api/whoami-v2")[0]
            if status == 200:
                break
            time.sleep(0.3)
        took = time.monotonic() - start
        assert status == 200 and took < 6, (status, took)
        answers = []
        for s in slow:
            s.settimeout(5)
            try:
                answers.append(s.recv(4096))
            except OSError:
                answers.append(b"")
            s.close()
        assert any(a.startswith(b"HTTP/1.1 408") for a in answers), answers


def test_one_client_cannot_take_every_connection(tmp_path):
    limits = Limits(max_connections=16, max_per_client=3, cap_loopback=True, header_timeout=5)
    with LocalHub(tmp_path / "data", tokens={TOKEN: USER}, limits=limits) as hub:
        held = [socket.create_connection(_host(hub.endpoint), timeout=5) for _ in range(3)]
        time.sleep(0.3)
        status, body = _raw(hub.endpoint, "GET", "/api/whoami-v2")
        assert status == 503 and b"too many connections" in body
        for s in held:
            s.close()
        deadline = time.monotonic() + 5
        while hub.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _raw(hub.endpoint, "GET", "/api/whoami-v2")[0] == 200


def test_loopback_clients_are_not_capped_per_client_by_default(tmp_path):
    limits = Limits(max_connections=16, max_per_client=2, header_timeout=5)
    with LocalHub(tmp_path / "data", tokens={TOKEN: USER}, limits=limits) as hub:
        held = [socket.create_connection(_host(hub.endpoint), timeout=5) for _ in range(4)]
        time.sleep(0.3)
        assert _raw(hub.endpoint, "GET", "/api/whoami-v2")[0] == 200
        for s in held:
            s.close()


def test_request_log_keeps_only_the_latest_requests(tmp_path):
    with LocalHub(tmp_path / "data", tokens={TOKEN: USER}, limits=Limits(request_log=5)) as hub:
        for i in range(12):
            _raw(hub.endpoint, "GET", f"/api/models/{USER}/n{i}")
        kept = hub.requests
        assert [r.path for r in kept] == [f"/api/models/{USER}/n{i}" for i in range(7, 12)]


# ------------------------------------------------------------------ `hub serve` start-up

def _serve(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_metagpt", "hub", "serve", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("port", ["99999", "-5", "http"])
def test_hub_serve_refuses_a_port_out_of_range(tmp_path, port):
    proc = _serve("--data", str(tmp_path / "d"), f"--port={port}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --port:" in proc.stderr and "is not a port number (0-65535" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_hub_serve_names_a_missing_cert_file(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not really")
    proc = _serve("--data", str(tmp_path / "d"), "--cert", str(tmp_path / "nope.pem"), "--key", str(key))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: The --cert file {tmp_path / 'nope.pem'} does not exist" in proc.stderr


def test_hub_serve_with_a_bad_cert_says_so(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    proc = _serve("--data", str(tmp_path / "d"), "--cert", str(cert), "--key", str(key))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"Could not load --cert {cert}" in proc.stderr and "--port" not in proc.stderr


def test_hub_serve_with_an_unusable_data_folder_names_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _serve("--data", str(blocker / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"Cannot keep the local Hub's data in --data {blocker / 'x'}" in proc.stderr
    assert "--port" not in proc.stderr and "--cert" not in proc.stderr


def _serve_until_ready(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "hf_metagpt", "hub", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline().strip()
    assert first.startswith("export HF_ENDPOINT=http://127.0.0.1:"), proc.stderr.read()
    return proc, first.split("=", 1)[1]


def test_hub_serve_reads_tokens_from_a_file_and_the_environment(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# who may write\nalice:hf_file_token_a\n\nbob:hf_file_token_b\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    env["HF_METAGPT_HUB_TOKENS"] = "carol:hf_env_token_c, dave:hf_env_token_d"
    proc, endpoint = _serve_until_ready(["--data", str(tmp_path / "d"), "--token-file", str(tokens)], env)
    try:
        for token, user in [("hf_file_token_a", "alice"), ("hf_file_token_b", "bob"), ("hf_env_token_c", "carol"),
                            ("hf_env_token_d", "dave")]:
            status, body = _raw(endpoint, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
            assert status == 200 and json.loads(body)["name"] == user
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        if cmdline.exists():
            assert b"hf_file_token" not in cmdline.read_bytes()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "hf_file_token" not in out + err and "hf_env_token" not in out + err


def test_hub_serve_names_a_bad_token_file_line_without_printing_it(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:hf_ok\nbad user!:hf_secret_value\n")
    proc = _serve("--data", str(tmp_path / "d"), "--token-file", str(tokens))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--token-file {tokens}, line 2 is not TOKEN or USER:TOKEN" in proc.stderr
    assert "hf_secret_value" not in proc.stderr
