"""The pipeline streams' pass sequences on scripted arrivals and finishes (pure, fast)."""

from __future__ import annotations

import pytest

from coordinator.streams import Pass, Stream, StreamKnobs


class Script:
    """Drives one stream like the pipeline driver: a FIFO queue, one token per request per
    pass (the encode pass yields the first), a request finishes at its output length."""

    def __init__(self, stream: Stream, lengths: dict[str, int]) -> None:
        self.stream, self.lengths = stream, lengths
        self.queue: list[str] = []
        self.made: dict[str, int] = {}
        self.passes: list[Pass] = []

    def arrive(self, *req_ids: str) -> None:
        self.queue.extend(req_ids)

    def step(self, cancel: tuple[str, ...] = ()) -> Pass | None:
        p = self.stream.next_pass(self.queue)
        if p is None:
            return None
        self.queue = [r for r in self.queue if r not in p.admits]
        self.passes.append(p)
        finished = []
        for req_id in p.req_ids:
            self.made[req_id] = self.made.get(req_id, 0) + 1
            if self.made[req_id] >= self.lengths[req_id]:
                finished.append(req_id)
        self.stream.done(finished)
        for req_id in cancel:
            self.stream.release(req_id)
        return p

    def run(self, limit: int = 200) -> list[tuple[str, tuple[str, ...]]]:
        while self.step() is not None and len(self.passes) < limit:
            pass
        return [(p.kind, p.req_ids) for p in self.passes]


def _script(policy: str, batch: int, lengths: dict[str, int], n_d: int = 1) -> Script:
    return Script(Stream(0, StreamKnobs(policy, batch, n_d)), lengths)


def test_static_never_admits_mid_batch() -> None:
    s = _script("static", 2, {"a": 1, "b": 3, "c": 2, "d": 1})
    s.arrive("a", "b", "c")
    s.step()  # encode a, b
    s.arrive("d")  # arrives while the batch runs: waits for the whole batch
    assert s.run() == [("encode", ("a", "b")), ("decode", ("b",)), ("decode", ("b",)),
                       ("encode", ("c", "d")), ("decode", ("c",)), ("decode", ())]
    assert [p.free for p in s.passes] == [(), ("a",), (), ("b",), ("d",), ("c",)]


def test_continuous_admits_whenever_slots_are_free() -> None:
    s = _script("continuous", 3, {"a": 3, "b": 1, "c": 4, "d": 2, "e": 2})
    s.arrive("a", "b")
    assert s.step() == Pass("encode", ("a", "b"))
    s.arrive("c", "d", "e")  # b finished at encode: two free slots
    assert s.step() == Pass("encode", ("c", "d"), free=("b",))
    assert s.run() == [("encode", ("a", "b")), ("encode", ("c", "d")),
                       ("decode", ("a", "c", "d")), ("encode", ("e",)),  # d left: e joins
                       ("decode", ("a", "c", "e")), ("decode", ("c",)), ("decode", ())]
    assert [p.free for p in s.passes[3:]] == [("d",), (), ("a", "e"), ("c",)]


def test_rra_encodes_every_n_d_decode_passes() -> None:
    lengths = {f"r{i}": 10 for i in range(8)}
    s = _script("rra", 2, lengths, n_d=3)
    s.arrive(*lengths)
    kinds = "".join(k[0] for k, _ in s.run(limit=13))
    assert kinds == "eddd" "eddd" "eddd" "e"
    assert s.passes[4].req_ids == ("r2", "r3") and s.passes[5].req_ids == ("r0", "r1", "r2", "r3")


def test_rra_cycle_ends_early_when_the_batch_empties() -> None:
    s = _script("rra", 2, {"a": 2, "b": 1, "c": 1, "d": 5}, n_d=4)
    s.arrive("a", "b", "c", "d")
    assert s.run() == [("encode", ("a", "b")), ("decode", ("a",)), ("encode", ("c", "d")),
                       ("decode", ("d",)), ("decode", ("d",)), ("decode", ("d",)),
                       ("decode", ("d",)), ("decode", ())]


def test_rra_without_queued_work_decodes_whole_cycles() -> None:
    s = _script("rra", 4, {"a": 9, "b": 2}, n_d=2)
    s.arrive("a")
    s.step()
    s.step()
    s.step()  # encode, decode, decode: the cycle is over, nothing was queued
    s.step()  # a new cycle of decodes (the queue was empty at its boundary)
    s.arrive("b")
    assert s.step().kind == "decode"  # b waits for the cycle boundary, as the paper's RRA
    assert s.step() == Pass("encode", ("b",))


@pytest.mark.parametrize("policy", ["static", "continuous", "rra"])
def test_finished_and_cancelled_are_freed_exactly_once(policy: str) -> None:
    lengths = {f"r{i}": 1 + (i * 7) % 9 for i in range(12)}
    s = _script(policy, 4, lengths, n_d=3)
    s.arrive(*lengths)
    s.step()
    s.step(cancel=("r1", "r1", "r2"))  # double cancels and cancels after finish are no-ops
    s.run()
    freed = [r for p in s.passes for r in p.free]
    assert sorted(freed) == sorted(lengths) and len(freed) == len(set(freed))
    for i, p in enumerate(s.passes):  # never run after it was freed
        assert not set(p.req_ids) & {r for q in s.passes[: i + 1] for r in q.free}
    assert not s.stream.running and s.stream.next_pass([]) is None


def test_failed_pass_leaves_the_stream_and_is_freed_everywhere() -> None:
    stream = Stream(0, StreamKnobs("continuous", 4))
    stream.next_pass(["a", "b"])
    stream.done(["a"])
    p = stream.next_pass(["c"])
    assert p == Pass("encode", ("c",), free=("a",))
    stream.failed()  # stages before the failing one still hold c; after it, a
    assert list(stream.running) == ["b"] and stream.pending_free == ("a", "c")
    assert stream.next_pass([]) == Pass("decode", ("b",), free=("a", "c"))


def test_one_pass_in_flight_and_reset_frees_everything() -> None:
    stream = Stream(1, StreamKnobs("static", 3))
    assert stream.next_pass(["a", "b"]) is not None
    assert stream.next_pass(["c"]) is None  # busy
    assert stream.reset() == ["a", "b"]
    assert stream.busy is None and stream.pending_free == ("a", "b")
    assert stream.next_pass([]) == Pass("decode", (), free=("a", "b"))


def test_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="policy"):
        StreamKnobs("waa", 4)
    with pytest.raises(ValueError, match="B_E"):
        StreamKnobs("rra", 0)
    with pytest.raises(ValueError, match="N_D"):
        StreamKnobs("rra", 4, n_d=0)
