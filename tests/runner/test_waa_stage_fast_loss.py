"""A staged WAA decoder stage whose join breaks: a TP stage's broken collective (a peer rank
died; gloo raises a plain RuntimeError) fails the worker, which says goodbye
(``Error("worker_lost")``) and exits 1 like the whole-model TP workers; a bad input still fails
just its pass. The join is the only collective waa_stage.py itself guarded."""

from __future__ import annotations

import signal
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from common import protocol as P
from common.backend_waa_stage import WaaDecoderStage, WaaEncoderStage
from common.workerconfig import WorkerConfig
from common.workermain import run_worker
from decoder_worker import waa_stage
from tests.mesh.test_rejoin import FakeCoordinator, Log
from tests.runner.test_waa_stage_units import SPEC, FakeLink, Quiet, _encode_pass, _handoff

torch.set_num_threads(1)
GLOO_DEAD_PEER = "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:35493"


class BrokenJoin(WaaDecoderStage):
    """A decoder stage whose join raises ``exc`` (as a TP stage's KV broadcast would)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(SPEC, (0, 2), dtype="float32")
        self.exc = exc

    def join(self, sp: P.StagePass) -> None:
        raise self.exc


def _ready_pass(dec: WaaDecoderStage) -> P.StagePass:
    """A decode pass of request "a", whose whole KV is already here (join comes next)."""
    enc = WaaEncoderStage(SPEC, (0, 2), dtype="float32")
    first = {t.req_id: t.token for t in enc.run(_encode_pass()).tokens}
    dec.take(_handoff(enc, "a", (0, 2)))
    return P.StagePass(pass_id=3, stream=0, kind="decode", req_ids=("a",),
                       tokens=(first["a"],))


def _loop(exc: Exception, tp_size: int) -> tuple[waa_stage.DecoderStageLoop, FakeLink,
                                                  P.StagePass]:
    dec, link = BrokenJoin(exc), FakeLink()
    cfg = types.SimpleNamespace(worker_id="dec0", stage=1, tp_size=tp_size)
    loop = waa_stage.DecoderStageLoop(cfg, link, dec, Quiet())  # type: ignore[arg-type]
    return loop, link, _ready_pass(dec)


def test_a_broken_collective_in_a_tp_stage_fails_the_worker() -> None:
    loop, link, sp = _loop(RuntimeError(GLOO_DEAD_PEER), tp_size=2)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        loop.run_pass(sp)
    assert link.sent == []  # no PassDone: the goodbye tells the coordinator instead


@pytest.mark.parametrize(("exc", "tp_size"), [(ValueError("bad KV part"), 2),
                                               (RuntimeError("shape mismatch"), 1)])
def test_a_bad_join_fails_just_its_pass(exc: Exception, tp_size: int) -> None:
    loop, link, sp = _loop(exc, tp_size)
    loop.run_pass(sp)
    done = link.sent[-1]
    assert isinstance(done, P.PassDone) and done.pass_id == 3
    assert done.error is not None and str(exc) in done.error
    assert loop.failed_passes == 1 and "a" not in loop.dec.pending  # freed with the pass


def test_the_tp_stage_says_goodbye_and_exits_1(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Through run_worker and a real link: the coordinator hears ``worker_lost`` at once."""
    import common.workermain

    log = Log()
    monkeypatch.setattr(common.workermain, "setup_worker_logs", lambda cfg: log)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # only the main thread may
    endpoint = f"ipc://{tmp_path}/co"
    coordinator = FakeCoordinator(endpoint)
    cfg = WorkerConfig(role="pipeline", worker_id="dec0.r0", coordinator=endpoint, stage=1,
                       tp_rank=0, tp_size=2, kv_bind=f"ipc://{tmp_path}/kv",
                       heartbeat_interval_s=0.1, heartbeat_timeout_s=5.0, startup_timeout_s=5.0)
    dec = BrokenJoin(RuntimeError(GLOO_DEAD_PEER))
    sp = _ready_pass(dec)

    def make_loop(link: Any, assign: P.Assign, log: Any) -> waa_stage.DecoderStageLoop:
        return waa_stage.DecoderStageLoop(cfg, link, dec, log)

    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(run_worker(cfg, make_loop)),
                              daemon=True)
    try:
        runner.start()
        route, _ = coordinator.recv(P.Hello)
        coordinator.send(route, P.Assign(worker_id="dec0.r0", role="pipeline",
                                         heartbeat_interval_s=0.1, tp_rank=0, tp_size=2,
                                         config={"model": {"x": 1}, "instance": "A"}))
        coordinator.recv(P.Ready)
        coordinator.send(route, sp)
        _, msg = coordinator.recv(P.Error, timeout_s=3.0)  # well before the 5 s deadline
        runner.join(5)
        assert result == [1]
        assert (msg.code, msg.req_id) == ("worker_lost", None)
        assert "Connection closed by peer" in msg.message and msg.message.startswith("dec0.r0")
    finally:
        coordinator.sock.close(linger=0)
