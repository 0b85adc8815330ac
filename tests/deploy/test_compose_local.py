"""A generated docker-compose file, run without Docker: every service's command and environment
as a local process, service hostnames mapped to 127.0.0.1, container ports to free host ports,
volume targets to local directories. Then requests go through the published client port.

Null model (no weights): this checks the wiring compose gives the mesh (endpoints by service
name, KV advertised per decoder or pipeline stage, stage s finding stage s+1, registration,
READY, serving, JSON logs in the runs volume, ordered shutdown) for a WAA plan (encoders and
decoders) and an RRA plan (stage workers), which does not depend on the math; the real-model
mesh has its own tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from common.backend import null_tokens
from common.client import AsyncClient
from common.errors import Unavailable

ROOT = Path(__file__).resolve().parents[2]
EXEGPT = [sys.executable, "-m", "coordinator.cli"]


class LocalCompose:
    """Translate compose services into local processes (what Docker's network and volumes do)."""

    def __init__(self, data: dict, workdir: Path, free_port: Callable[[], int]) -> None:
        self.services: dict = data["services"]
        self.workdir, self.free_port = workdir, free_port
        self.ports: dict[tuple[str, int], int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def port(self, service: str, port: int) -> int:
        """One host port per (container, port): two containers may both listen on 6000."""
        return self.ports.setdefault((service, port), self.free_port())

    def localize(self, service: str, text: str) -> str:
        text = re.sub(r"tcp://0\.0\.0\.0:(\d+)",
                      lambda m: f"tcp://127.0.0.1:{self.port(service, int(m[1]))}", text)
        for name in self.services:
            text = re.sub(rf"tcp://{re.escape(name)}:(\d+)",
                          lambda m, n=name: f"tcp://127.0.0.1:{self.port(n, int(m[1]))}", text)
        for volume in self.services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            text = text.replace(target, str((self.workdir / source).resolve()))
        return text

    def argv(self, service: str) -> list[str]:
        cmd = [self.localize(service, a) for a in self.services[service]["command"]]
        assert cmd[0] == "python", cmd
        return [sys.executable, *cmd[1:]]

    def env(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXEGPT_")}
        for key, value in self.services[service].get("environment", {}).items():
            env[key] = self.localize(service, str(value))
        return env

    def published(self, service: str) -> str:
        host, container = self.services[service]["ports"][0].split(":")
        return f"tcp://127.0.0.1:{self.port(service, int(container))}"

    def start(self, service: str) -> None:
        for volume in self.services[service].get("volumes", []):  # docker creates missing ones
            source = self.workdir / volume.split(":")[0]
            if not source.exists():
                source.mkdir(parents=True)
        log = open(self.workdir / f"{service}.stderr", "wb")  # noqa: SIM115
        self.procs[service] = subprocess.Popen(self.argv(service), env=self.env(service),
                                               cwd=self.workdir, stdout=log, stderr=log)

    def stderr(self, service: str, tail: int = 3000) -> str:
        return (self.workdir / f"{service}.stderr").read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(params=["waa", "rra"])
def compose_run(request: pytest.FixtureRequest, tmp_path: Path, plan_file,  # noqa: ANN001
                free_port) -> Iterator[LocalCompose]:  # noqa: ANN001
    _, plan_path = plan_file(request.param, 3)
    out = tmp_path / "docker-compose.yml"
    done = subprocess.run([*EXEGPT, "compose", "--plan", str(plan_path), "--out", str(out),
                           "--null-model"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    local = LocalCompose(yaml.safe_load(out.read_text()), tmp_path, free_port)
    yield local
    local.stop()


async def _serve_when_ready(endpoint: str, prompts: list[list[int]], timeout_s: float) -> list:
    """Retry while the coordinator says unavailable (workers still registering), then send."""
    deadline = time.monotonic() + timeout_s
    async with AsyncClient(endpoint, default_timeout_s=timeout_s) as client:
        while True:
            try:
                await client.generate(prompt_ids=[1, 2, 3], max_new_tokens=1)
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        return await asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=8 + i)
                                      for i, p in enumerate(prompts)))


def test_compose_services_as_local_processes(compose_run: LocalCompose) -> None:
    local = compose_run
    workers = [s for s in local.services if s != "coordinator"]
    policy = local.services["coordinator"]["command"]
    pipeline = "--policy" in policy and policy[policy.index("--policy") + 1] != "waa"
    assert sorted(workers) == (["stage0", "stage1", "stage2"] if pipeline
                               else ["dec0", "enc0", "enc1"])
    for service in workers:  # workers first: they retry HELLO until the coordinator is up,
        local.start(service)  # as containers started in any order do
    local.start("coordinator")
    prompts = [[7 + i, 100 + i, 5] for i in range(12)]
    try:
        results = asyncio.run(_serve_when_ready(local.published("coordinator"), prompts, 60))
    except Exception:
        pytest.fail("mesh did not serve; stderr:\n" +
                    "\n".join(f"--- {s}\n{local.stderr(s)}" for s in local.procs))
    vocab = 49152  # smollm2-135m, the --model-shape the compose file names
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        assert list(result.tokens) == null_tokens(prompt, 8 + i, vocab)
    stop_and_check_logs(local, workers)


def stop_and_check_logs(local: LocalCompose, workers: list[str]) -> None:
    """SIGTERM to the coordinator (what `docker compose stop` sends): it drains, tells the
    workers to shut down, and everyone exits 0, having logged JSON into the runs volume."""
    local.procs["coordinator"].send_signal(signal.SIGTERM)
    for service, proc in local.procs.items():
        assert proc.wait(timeout=30) == 0, f"{service}:\n{local.stderr(service)}"
    run_dir = local.workdir / "runs" / "compose"
    files = sorted(p.name for p in run_dir.glob("*.jsonl"))
    assert "coordinator.jsonl" in files and len(files) == 1 + len(workers), files
    for line in (run_dir / "coordinator.jsonl").read_text().splitlines():
        json.loads(line)
    # EXEGPT_LOG_CONSOLE=json: the console (docker logs) is JSON lines too
    console = local.stderr("coordinator", tail=10**7).strip().splitlines()
    assert console and all(json.loads(line)["role"] == "coordinator" for line in console)


@pytest.mark.slow
def test_top_level_compose_file_serves_the_real_model(tmp_path: Path, free_port) -> None:  # noqa: ANN001
    """The shipped docker-compose.yml with the real SmolLM2 GGUF in ./models (slow: loads it)."""
    from common.models.gguf_loader import default_gguf_path
    from common.profiling.measure import resolve_model

    gguf = default_gguf_path()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / gguf.name).symlink_to(gguf)
    # what `exegpt compose` writes beside the model file (docs/deploy.md, step 2)
    (tmp_path / "models" / f"{gguf.name}.config.json").write_text(
        json.dumps(resolve_model(str(gguf)).to_dict()))
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for volume in data["services"]["coordinator"]["volumes"]:  # the plan file it ships with
        source = volume.split(":")[0]
        if (ROOT / source).is_file():
            (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / source).write_bytes((ROOT / source).read_bytes())
    local = LocalCompose(data, tmp_path, free_port)
    try:
        for service in local.services:
            local.start(service)
        prompts = [[1, 9690, 198, 2683, 359] * (i + 1) for i in range(3)]
        try:
            results = asyncio.run(_serve_when_ready(local.published("coordinator"), prompts, 240))
        except Exception:
            pytest.fail("mesh did not serve; stderr:\n" +
                        "\n".join(f"--- {s}\n{local.stderr(s)}" for s in local.procs))
        assert [len(r.tokens) for r in results] == [8, 9, 10]
        stop_and_check_logs(local, [s for s in local.services if s != "coordinator"])
    finally:
        local.stop()
