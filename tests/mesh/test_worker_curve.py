"""CURVE between coordinator and workers and between workers' KV endpoints (issue 7).

A mesh whose worker port and KV endpoints speak CURVE (keys from `exegpt keys --workers 1`)
serves a request; a worker with a key off the allow-list is refused (it exits with a clear
error, the coordinator logs the refusal and keeps serving), and so is a KV peer without the
mesh pair (the decoder logs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from common import protocol as P
from common.backend import null_tokens
from common.client import Client
from common.sockets import CurveKeys, load_curve_server, make_socket
from coordinator.commands.keys import write_keys
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup

VOCAB = 256


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    made = write_keys(root, num_clients=1, num_workers=1)
    assert made["mesh"] == [root / "mesh.key_secret"]
    zmq.auth.create_certificates(root, "stranger")  # a valid pair, on no allow-list
    return root


@pytest.fixture(scope="module")
def mesh(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1)),
                      runs_path=tmp_path_factory.mktemp("runs"), transport="tcp",
                      decode_cost_ms=1.0, drain_timeout_s=1.0,
                      coordinator_args=("--curve-server-key", str(keys / "server.key_secret"),
                                        "--curve-allow", str(keys / "allow"),
                                        "--curve-worker-allow", str(keys / "allow-workers")),
                      worker_args=("--curve-coordinator-key", str(keys / "server.key"),
                                   "--curve-key", str(keys / "workers/worker-0.key_secret"),
                                   "--curve-mesh-key", str(keys / "mesh.key_secret")))
    local = LocalMesh(spec)
    local.start()
    yield local
    local.stop()


def _client(mesh: LocalMesh, keys: Path) -> Client:
    return Client(mesh.client_endpoint, default_timeout_s=20,
                  server_public_key=str(keys / "server.key"),
                  client_keys=str(keys / "clients/client-0.key_secret"))


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _serves(mesh: LocalMesh, keys: Path, prompt: list[int]) -> None:
    with _client(mesh, keys) as client:
        out = client.generate(prompt_ids=prompt, max_new_tokens=12)
    assert list(out.tokens) == null_tokens(prompt, 12, VOCAB)


def test_a_curve_mesh_serves_and_its_kv_endpoints_speak_curve(mesh: LocalMesh,
                                                              keys: Path) -> None:
    _serves(mesh, keys, [3, 4, 5])
    decoder_log = next(mesh.spec.run_dir.glob("decoder-*.jsonl"))
    enabled = [e for e in _events(decoder_log) if e.get("event") == "kv_curve_enabled"]
    assert enabled and enabled[0]["mesh_public_key"] == load_curve_server(
        str(keys / "mesh.key_secret")).public


def test_a_worker_with_the_wrong_key_is_refused_and_the_mesh_keeps_serving(
        mesh: LocalMesh, keys: Path) -> None:
    ready = next(e for e in mesh.events if e.get("event") == "ready")
    proc = subprocess.run(
        [sys.executable, "-m", "encoder_worker", "--coordinator", str(ready["worker_endpoint"]),
         "--worker-id", "intruder", "--null-model", "--startup-timeout", "3",
         "--curve-coordinator-key", str(keys / "server.key"),
         "--curve-key", str(keys / "stranger.key_secret")],
        capture_output=True, text=True, timeout=60,
        env={"EXEGPT_RUNS_DIR": str(mesh.spec.runs_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert "refuse this worker's CURVE key" in proc.stderr, proc.stderr
    refusals = [e for e in _events(mesh.spec.run_dir / "coordinator.jsonl")
                if e.get("event") == "auth_refused" and e.get("port") == "workers"]
    assert refusals and refusals[0]["why"] == "key not on the allow-list", refusals
    assert mesh.coordinator is not None and mesh.coordinator.poll() is None
    _serves(mesh, keys, [9, 8])


def test_a_kv_peer_without_the_mesh_pair_is_refused(mesh: LocalMesh, keys: Path) -> None:
    with _client(mesh, keys) as client:
        workers = client.stats().stats["workers"]
    endpoint = next(w["kv_endpoint"] for w in workers if w["role"] == "decoder")
    mesh_public = load_curve_server(str(keys / "mesh.key_secret")).public
    stranger_public, stranger_secret = zmq.auth.load_certificate(keys / "stranger.key_secret")
    assert stranger_secret is not None
    ctx = zmq.Context()
    sock = make_socket(ctx, "DEALER", connect=endpoint, curve_client=CurveKeys(
        public=stranger_public.decode(), secret=stranger_secret.decode(),
        server_public=mesh_public))
    try:
        sock.send_multipart(P.encode(P.Cancel(req_id="x")), zmq.NOBLOCK)
        decoder_log = next(mesh.spec.run_dir.glob("decoder-*.jsonl"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            refused = [e for e in _events(decoder_log) if e.get("event") == "kv_auth_refused"]
            if refused:
                break
            time.sleep(0.1)
        assert refused and refused[0]["client_key"] == stranger_public.decode()
        assert not sock.poll(300)  # no answer: the message never reached the decoder
    finally:
        sock.close(linger=0)
        ctx.term()
    _serves(mesh, keys, [1, 2])


def test_compose_gives_each_worker_only_its_keys() -> None:
    from coordinator.commands._compose_spec import ComposeOptions, compose_dict
    from tests.deploy.conftest import make_plan

    plan = make_plan("waa", 2)
    with pytest.raises(ValueError, match="needs --curve-dir"):
        ComposeOptions(null_model=True, curve_workers=True)
    plain = compose_dict(plan, ComposeOptions(null_model=True, curve_dir="./keys"))
    assert "--curve-worker-allow" not in plain["services"]["coordinator"]["command"]
    assert all("--curve-key" not in s["command"] for n, s in plain["services"].items()
               if n != "coordinator")
    services = compose_dict(plan, ComposeOptions(null_model=True, curve_dir="./keys",
                                                 curve_workers=True))["services"]
    cmd = services.pop("coordinator")["command"]
    assert cmd[cmd.index("--curve-worker-allow") + 1] == "/keys/allow-workers"
    assert len(services) >= 2
    for index, service in enumerate(services.values()):
        cmd = service["command"]
        assert cmd[cmd.index("--curve-coordinator-key") + 1] == "/keys/server.key"
        assert cmd[cmd.index("--curve-key") + 1] == "/keys/worker.key_secret"
        assert cmd[cmd.index("--curve-mesh-key") + 1] == "/keys/mesh.key_secret"
        assert f"./keys/workers/worker-{index}.key_secret:/keys/worker.key_secret:ro" in \
            service["volumes"]
        assert not any("server.key_secret" in v or v.startswith("./keys:")
                       for v in service["volumes"])  # no other secrets in a worker
