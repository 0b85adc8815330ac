"""CURVE on the client port: keys from `exegpt keys`; an allowed client is served, a client
without keys or with a key off the allow-list is refused (AuthenticationFailed, fast), the
coordinator logs each refusal and keeps serving the others."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq.auth

from common.backend import null_tokens
from common.client import AsyncClient, Client, curve_client_keys
from common.errors import AuthenticationFailed
from common.sockets import load_allow_list, load_curve_server, read_public_key
from coordinator.commands.keys import write_keys
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup

VOCAB = 256


def test_keys_layout_is_complete_and_rerunning_keeps_existing_pairs(tmp_path: Path) -> None:
    made = write_keys(tmp_path, num_clients=2, num_workers=1)
    assert [len(made[k]) for k in ("server", "clients", "workers")] == [1, 2, 1]
    server = load_curve_server(str(tmp_path / "server.key_secret"))
    assert read_public_key(str(tmp_path / "server.key")) == server.public
    allowed = load_allow_list(str(tmp_path / "allow"))
    client = curve_client_keys(str(tmp_path / "server.key"),
                               str(tmp_path / "clients" / "client-1.key_secret"))
    assert client is not None and client.public in allowed and len(allowed) == 2
    assert client.server_public == server.public
    assert (tmp_path / "server.key_secret").stat().st_mode & 0o077 == 0
    again = write_keys(tmp_path, num_clients=3)
    assert again["server"] == [] and len(again["clients"]) == 1
    assert load_curve_server(str(tmp_path / "server.key_secret")) == server
    with pytest.raises(ValueError, match="both server_public_key"):
        curve_client_keys(str(tmp_path / "server.key"), None)
    with pytest.raises(ValueError, match="only a public key"):
        curve_client_keys(server.public, str(tmp_path / "allow" / "client-0.key"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    write_keys(root, num_clients=2, num_workers=1)
    zmq.auth.create_certificates(root, "stranger")  # a valid pair, not on the allow-list
    return root


@pytest.fixture(scope="module")
def curve_mesh(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """CURVE on both ports: clients by the allow-list, workers by theirs."""
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1)),
                      runs_path=tmp_path_factory.mktemp("runs"), transport="tcp",
                      decode_cost_ms=2.0, drain_timeout_s=1.0,
                      coordinator_args=("--curve-server-key", str(keys / "server.key_secret"),
                                        "--curve-allow", str(keys / "allow"),
                                        "--curve-worker-allow", str(keys / "allow-workers")),
                      worker_args=("--curve-coordinator-key", str(keys / "server.key"),
                                   "--curve-key", str(keys / "workers/worker-0.key_secret")))
    local = LocalMesh(spec)
    local.start()
    yield local
    local.stop()


def _client_args(keys: Path, name: str) -> dict[str, str]:
    return {"server_public_key": str(keys / "server.key"),
            "client_keys": str(keys / name)}


def test_authenticated_served_unauthenticated_refused(curve_mesh: LocalMesh, keys: Path) -> None:
    async def run() -> None:
        good = AsyncClient(curve_mesh.client_endpoint, default_timeout_s=20,
                           **_client_args(keys, "clients/client-0.key_secret"))
        plain = AsyncClient(curve_mesh.client_endpoint, default_timeout_s=20)
        stranger = AsyncClient(curve_mesh.client_endpoint, default_timeout_s=20,
                               **_client_args(keys, "stranger.key_secret"))
        try:
            first = asyncio.create_task(good.generate(prompt_ids=[5, 6], max_new_tokens=50))
            for refused in (plain, stranger):
                t0 = time.monotonic()
                with pytest.raises(AuthenticationFailed, match="refused") as err:
                    await refused.generate(prompt_ids=[1], max_new_tokens=4)
                assert time.monotonic() - t0 < 5, "refusal must not wait for the timeout"
                with pytest.raises(AuthenticationFailed):  # and stays refused, at once
                    await refused.generate(prompt_ids=[1], max_new_tokens=4)
            assert "allow-list" in str(err.value)
            out = await first
            assert list(out.tokens) == null_tokens([5, 6], 50, VOCAB)
            again = await good.generate(prompt_ids=[7], max_new_tokens=5)
            assert list(again.tokens) == null_tokens([7], 5, VOCAB)
        finally:
            for client in (good, plain, stranger):
                await client.close()

    asyncio.run(run())
    log = curve_mesh.spec.run_dir / "coordinator.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    enabled = next(e for e in events if e.get("event") == "curve_enabled")
    assert enabled["ports"] == ["clients", "workers"]  # the workers joined with their keys
    refusals = [e for e in events if e.get("event") == "auth_refused"]
    whys = {e["why"] for e in refusals}
    assert "key not on the allow-list" in whys, refusals[:3]
    assert any("no CURVE keys" in w for w in whys), whys  # the keyless client


def test_blocking_client_with_keys_from_the_environment(
        curve_mesh: LocalMesh, keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEGPT_CURVE_SERVER_PUBLIC", str(keys / "server.key"))
    monkeypatch.setenv("EXEGPT_CURVE_CLIENT_KEY", str(keys / "clients/client-1.key_secret"))
    with Client(curve_mesh.client_endpoint, default_timeout_s=20) as client:
        out = client.generate(prompt_ids=[3], max_new_tokens=3)
        assert list(out.tokens) == null_tokens([3], 3, VOCAB)
        assert client.stats().stats["requests"]["completed"] >= 1


def test_cli_generate_and_stats_connect_with_keys(
        curve_mesh: LocalMesh, keys: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.cli import main

    for var in ("EXEGPT_CURVE_SERVER_PUBLIC", "EXEGPT_CURVE_CLIENT_KEY"):
        monkeypatch.setenv(var, "")  # empty = unset; restored after the test (the CLI sets them)
    ep = curve_mesh.client_endpoint
    assert main(["generate", "--connect", ep, "--prompt-ids", "4,5", "--max-new-tokens", "6",
                 "--timeout", "5", "--json"]) == 2
    assert "refused" in capsys.readouterr().err
    key_args = ["--server-key", str(keys / "server.key"),
                "--client-key", str(keys / "clients/client-0.key_secret")]
    assert main(["generate", "--connect", ep, "--prompt-ids", "4,5", "--max-new-tokens", "6",
                 "--json", *key_args]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == null_tokens([4, 5], 6, VOCAB)
    assert main(["stats", "--connect", ep, "--json", *key_args]) == 0
    assert json.loads(capsys.readouterr().out)["requests"]["completed"] >= 1


def test_compose_mounts_the_keys_and_turns_curve_on() -> None:
    from coordinator.commands._compose_spec import ComposeOptions, compose_dict
    from tests.deploy.conftest import make_plan

    plan = make_plan("waa", 2)
    plain = compose_dict(plan, ComposeOptions(null_model=True))["services"]["coordinator"]
    assert "--curve-server-key" not in plain["command"]
    curve = compose_dict(plan, ComposeOptions(null_model=True, curve_dir="./keys"))
    service = curve["services"]["coordinator"]
    cmd = service["command"]
    assert cmd[cmd.index("--curve-server-key") + 1] == "/keys/server.key_secret"
    assert cmd[cmd.index("--curve-allow") + 1] == "/keys/allow"
    assert "./keys:/keys:ro" in service["volumes"]
