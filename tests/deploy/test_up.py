"""`exegpt up`: the profile cache, the plan -> serve mapping, the demo's numbers, end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.models.config import ModelConfig
from coordinator.commands import _up_demo as demo
from coordinator.commands._mesh_proc import serve_argv
from coordinator.commands._up_profile import (
    ProfileKey,
    cache_dir,
    load_or_measure,
    torch_version,
    valid_tp_sizes,
)

EXEGPT = [sys.executable, "-m", "coordinator.cli"]
SMOL = ModelConfig.preset("smollm2-135m")


def _key(**changes: object) -> ProfileKey:
    fields = {"label": "SmolLM2", "model": SMOL, "device": "cpu", "dtype": "bfloat16",
              "torch_version": "2.13.0", "num_threads": 1, "tp_sizes": (1,)} | changes
    return ProfileKey(**fields)  # type: ignore[arg-type]


def _analytic_data(cfg: ModelConfig = SMOL) -> dict:
    from coordinator.planner.analytic import analytic_profile

    profile = analytic_profile("a40", cfg, "bfloat16", (1,))
    return {"meta": profile.meta, "rows": profile.rows}


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "exegpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "exegpt"


def test_key_changes_with_everything_that_changes_timings() -> None:
    base = _key().filename()
    assert _key().filename() == base
    assert _key(label="SmolLM2").filename() == base
    others = [_key(torch_version="2.14.0"), _key(num_threads=2), _key(dtype="float32"),
              _key(device="cuda:0"), _key(tp_sizes=(1, 2)), _key(model=ModelConfig.preset(
                  "tiny-llama"))]
    names = {k.filename() for k in others}
    assert base not in names and len(names) == len(others)
    renamed = ModelConfig.from_dict(SMOL.to_dict() | {"name": "another name"})
    assert _key(model=renamed).filename() == base  # same shape, same costs


def test_valid_tp_sizes_follow_the_heads() -> None:
    assert valid_tp_sizes(SMOL, 4) == (1, 3)  # 9 heads, 3 KV heads, ffn 1536
    assert valid_tp_sizes(SMOL, 2) == (1,)


def test_measures_once_then_reads_the_cache(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[tuple] = []

    def measure(model: ModelConfig, tp: tuple, dtype: str, device: str, **kw: object) -> dict:
        calls.append((model.name, tp, dtype, device, kw["num_threads"]))
        return _analytic_data(model)

    said: list[str] = []
    key = _key()
    _, path, fresh = load_or_measure(key, say=said.append, measure=measure)
    assert fresh and path == tmp_path / "exegpt" / key.filename() and path.is_file()
    assert calls == [("smollm2-135m", (1,), "bfloat16", "cpu", 1)]
    assert any("profiling" in s and "first run only" in s for s in said)
    profile, _, fresh = load_or_measure(key, say=said.append, measure=measure)
    assert not fresh and len(calls) == 1 and profile.model.num_layers == 30
    path.write_text("{not json")
    _, _, fresh = load_or_measure(key, say=said.append, measure=measure)
    assert fresh and len(calls) == 2 and any("unusable" in s for s in said)


def test_serve_argv(plan_file, tmp_path: Path) -> None:  # noqa: ANN001
    plan, path = plan_file("waa", 3)  # two encoder stages and a decoder
    common = {"model_path": "/m/model.gguf", "endpoint": "tcp://127.0.0.1:1",
              "runs_dir": tmp_path}
    with_plan = serve_argv(plan, path, null_model=False, flags={"--plan", "--model"}, **common)
    assert with_plan[with_plan.index("--plan") + 1] == str(path)
    assert with_plan[with_plan.index("--model") + 1] == "/m/model.gguf"
    with pytest.raises(ValueError, match="--null-model"):
        serve_argv(plan, path, null_model=False, flags=set(), **common)
    with pytest.raises(ValueError, match="one encoder group plus one decoder group"):
        serve_argv(plan, path, null_model=False, flags={"--model"}, **common)
    legacy = serve_argv(plan, path, null_model=True, flags=set(), **common)
    enc = sum(g.count for g in plan.groups("encoder"))
    assert legacy[legacy.index("--encoders") + 1] == str(enc)
    assert legacy[legacy.index("--encode-batch") + 1] == str(plan.B_E)
    assert "--null-model" in legacy and "--plan" not in legacy


def test_serve_argv_real_model_without_plan_support(plan_file, tmp_path: Path) -> None:  # noqa: ANN001
    plan, path = plan_file("waa", 2, "two.json")
    assert sorted(g.role for g in plan.worker_groups) == ["decoder", "encoder"]
    argv = serve_argv(plan, path, model_path="/m/x.gguf", endpoint="tcp://127.0.0.1:1",
                      runs_dir=tmp_path, null_model=False, dtype="float32",
                      flags={"--model", "--dtype"})
    assert argv[argv.index("--model") + 1] == "/m/x.gguf" and "--null-model" not in argv
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--encoders") + 1] == "1" == argv[argv.index("--decoders") + 1]


def test_demo_requests_and_numbers() -> None:
    reqs = demo.build_requests(None, num_requests=5, num_probes=2, p99_output=40,
                               max_output=64, vocab_size=1000)
    assert [r.probe for r in reqs] == [False, False, False, True, True]
    assert [r.max_new_tokens for r in reqs] == [64, 64, 64, 40, 40]
    assert all(r.stop_token_ids == () and max(r.prompt_ids) < 1000 for r in reqs)
    answers = tuple(demo.Answer(r, "x", n, lat, 0.1) for r, n, lat in
                    zip(reqs, (10, 20, 30, 40, 40), (1.0, 2.0, 3.0, 4.0, 5.5), strict=True))
    failed = demo.Answer(reqs[0], "", 0, 9.0, None, "Timeout: late")
    out = demo.DemoOutcome(answers + (failed,), wall_s=10.0, bound_s=5.0)
    assert out.throughput_seq_s == pytest.approx(0.5)
    assert out.throughput_tok_s == pytest.approx(14.0)
    assert out.p99_length_latency_s == 5.5 and not out.within_bound
    assert "OVER the bound" in demo.render(out) and "Timeout: late" in demo.render(out)


def _seed_cache(cache: Path, model: ModelConfig) -> Path:
    key = ProfileKey("smollm2-135m", model, "cpu", "bfloat16", torch_version(), 1,
                     valid_tp_sizes(model, 2))
    path = cache / "exegpt" / key.filename()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_analytic_data(model)))
    return path


def test_up_demo_end_to_end_null_model(tmp_path: Path) -> None:
    """Cached profile -> plan -> `exegpt serve` -> SDK batch -> numbers -> clean exit."""
    cached = _seed_cache(tmp_path / "cache", SMOL)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*EXEGPT, "up", "--model", "smollm2-135m", "--null-model", "--demo",
                           "--port", "0", "--latency-bound", "1000", "--policy", "waa",
                           "--demo-requests", "6", "--demo-probes", "2",
                           "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"profile: {cached}" in out and "profiling" not in out
    assert "policy" in out and "worker groups" in out  # the plan
    assert "exegpt serving (null model, smollm2-135m) on tcp://127.0.0.1:" in out
    assert out.count("Q: ") == 6 and out.count("p99-length probe (") == 2
    assert "within the bound" in out and "(6 ok, 0 failed)" in out
    assert (tmp_path / "runs" / "up-plan.json").is_file()


def test_up_reports_an_infeasible_bound(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(_analytic_data()))
    done = subprocess.run([*EXEGPT, "up", "--model", "smollm2-135m", "--profile", str(profile),
                           "--latency-bound", "0.0001", "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no plan meets the 0.0001 s bound" in done.stderr


def test_auto_policy_serves_the_planners_best_plan(capsys: pytest.CaptureFixture) -> None:
    """serve runs every plan the planner makes (staged WAA for T5 too), so `up` serves the
    best one, with no fallback to another family."""
    import argparse

    from coordinator.commands import up
    from coordinator.planner.profile import Profile

    profile = Profile(**_analytic_data())
    args = argparse.Namespace(workload="in=normal:32,16,64;out=normal:16,8,32", workers=2,
                              latency_bound=1e9, null_model=False)
    from coordinator.planner import make_plan, parse_workload

    unrestricted = make_plan(parse_workload(args.workload), profile, 2, 1e9, policy="auto")
    plan = up._plan(args, profile, "auto")
    assert up.runnable_problem(plan, null_model=False) is None
    assert plan.to_dict() | {"search": None} == unrestricted.to_dict() | {"search": None}
    assert "cannot run" not in capsys.readouterr().out


def test_up_serves_until_interrupted(tmp_path: Path) -> None:
    """Without --demo, `up` becomes `exegpt serve` (exec): it prints where to connect, serves,
    and stops the mesh in order on Ctrl-C."""
    import signal

    from common.client import Client

    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(_analytic_data()))
    proc = subprocess.Popen([*EXEGPT, "up", "--model", "smollm2-135m", "--null-model",
                             "--profile", str(profile), "--policy", "waa", "--workers", "2",
                             "--latency-bound", "1000", "--port", "0", "--runs-dir",
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        endpoint = None
        for line in proc.stdout:
            found = re.search(r"serving on (tcp://[\d.]+:\d+)", line)
            if found and endpoint is None:
                endpoint = found[1]
            if line.startswith("exegpt serving"):
                break
        assert endpoint is not None
        with Client(endpoint, default_timeout_s=30) as client:
            assert len(client.generate(prompt_ids=[1, 2, 3], max_new_tokens=5).tokens) == 5
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
