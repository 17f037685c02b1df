"""The planner and its cost model: decisions on fixed costs (deterministic), chunks that
follow speeds and causal cost, the fit of measured block times, devices of different
speed in real runs, and a request that survives a rank dying."""
import dataclasses
import itertools
import math

import pytest
import torch

from astra import catalog
from astra.parallel import comm as comm_mod
from astra.parallel import costmodel, planner, probe, wire
from astra.parallel.costmodel import BlockCost, ComputeCost, predict_astra, predict_single
from astra.parallel.links import LinkModel
from astra.parallel.runner import Job, launch, summarize
from astra.parallel.survive import report, run_planned


def _cost(causal=False, T=512, L=12, per_token=1e-4, per_pair=1e-7, fixed=1e-4):
    b = BlockCost(fixed, per_token, per_pair, per_pair)
    return ComputeCost(layers=L, causal=causal, tokens=T, single=b, astra=b,
                       head_per_token_s=1e-6, bits_per_token=10, dim=384,
                       send_share=0.1, local_share=0.25, exchange_s=1e-4)


def _bound(N, L, latency_s, t1):  # astra.bench.e2e.bound
    return N / (1 + N * L * latency_s / t1)


def test_auto_picks_single_where_the_bound_is_below_one_and_astra_where_it_is_high():
    short = _cost(T=64, per_token=2e-5)  # little compute per layer
    slow_link = LinkModel(10, 20.0)      # 20 ms per layer exchange
    t1 = predict_single(short)
    assert _bound(4, short.layers, 0.020, t1) < 1
    p = planner.plan(short, [1, 1, 1, 1], slow_link)
    assert p.strategy == "single" and p.devices == [0] and p.chunks is None
    assert p.predicted_s == pytest.approx(t1)

    long = _cost(T=2048)
    fast_link = LinkModel(100, 0.5)
    assert _bound(4, long.layers, 0.0005, predict_single(long)) > 3
    p = planner.plan(long, [1, 1, 1, 1], fast_link)
    assert p.strategy == "astra" and p.devices == [0, 1, 2, 3]
    assert p.predicted_s < p.single_s / 3
    assert sum(p.chunks) == 2048


def test_a_plan_is_deterministic_and_the_best_of_what_it_considered():
    cost = _cost(causal=True, T=1000)
    link = LinkModel(10, 5.0)
    a = planner.plan(cost, [1, 0.5, 1, 0.25], link)
    b = planner.plan(cost, [1, 0.5, 1, 0.25], link)
    assert a.as_dict() == b.as_dict() and a.considered == b.considered
    assert a.predicted_s * 1e3 == pytest.approx(min(c["predicted_ms"] for c in a.considered))
    # the k fastest devices, fastest first (ties by index)
    assert [c["devices"] for c in a.considered] == [[0], [0, 2], [0, 2, 1], [0, 2, 1, 3]]
    assert a.line().startswith("plan: ")


def test_chunks_follow_speeds():
    cost = _cost(T=900)
    ch = planner.balanced_chunks(cost, 900, [1.0, 0.5])
    assert sum(ch) == 900 and abs(ch[0] / ch[1] - 2) < 0.1


def test_causal_chunks_give_earlier_positions_more_tokens():
    cost = _cost(causal=True, T=2048, per_pair=1e-6)
    ch = planner.balanced_chunks(cost, 2048, [1, 1, 1, 1])
    assert ch == sorted(ch, reverse=True) and ch[0] > ch[-1] * 1.5


@pytest.mark.parametrize("causal", [False, True])
def test_balanced_chunks_minimize_the_slowest_rank(causal):
    cost = _cost(causal=causal, T=14, per_pair=3e-5)
    speeds = [1.0, 0.5, 0.25]
    got = planner.balanced_chunks(cost, 14, speeds)

    def worst(ch):
        bounds = [0] + list(itertools.accumulate(ch))
        return max(costmodel.rank_compute(cost, bounds[r], bounds[r + 1], 14, 3) / speeds[r]
                   for r in range(len(ch)))
    splits = [(a, b, 14 - a - b) for a in range(1, 13) for b in range(1, 14 - a)]
    assert worst(got) == pytest.approx(min(worst(s) for s in splits))


def test_without_link_costs_the_prediction_is_the_slowest_ranks_compute():
    cost = _cost(T=400)
    chunks, speeds = [200, 120, 80], [1.0, 0.6, 0.4]
    free = LinkModel(1e9, 0.0)
    per_rank = []
    for r, n in enumerate(chunks):
        lo = sum(chunks[:r])
        per_rank.append((cost.head_per_token_s * n + cost.layers *
                         costmodel.rank_compute(cost, lo, lo + n, 400, 3)) / speeds[r])
    got, detail = predict_astra(cost, chunks, speeds, free, detail=True)
    assert got == pytest.approx(max(per_rank), rel=1e-6)
    # each rank's busy time is its compute (the embedding aside)
    for d, r, n in zip(detail, per_rank, chunks):
        assert d["compute_s"] == pytest.approx(r - cost.head_per_token_s * n / speeds[
            chunks.index(n)], rel=1e-6)


def test_a_slower_link_never_predicts_faster():
    cost = _cost(causal=True, T=512)
    times = [predict_astra(cost, [160, 130, 120, 102], [1] * 4, LinkModel(bw, lat))
             for bw, lat in ((100, 0.5), (10, 0.5), (10, 5), (1, 20))]
    assert times == sorted(times)


def test_the_cost_model_frames_are_the_wires():
    assert costmodel.HEADER_BYTES == wire.HEADER_BYTES


def test_speeds_are_checked():
    assert planner.check_speeds(None, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="has 2 entries but there are 3"):
        planner.check_speeds([1, 1], 3)
    with pytest.raises(ValueError, match="must be positive"):
        planner.check_speeds([1, 0], 2)


def test_fit_block_recovers_known_coefficients():
    truth = BlockCost(2e-3, 4e-5, 1e-7, 3e-8)
    # causal shapes, as the probe times them: (tokens, local pairs, remote pairs) of the
    # rank holding [lo, lo + n) (non-causal ones cannot tell remote pairs from tokens and
    # local pairs at one length: n (T - n) = T n - n^2; any fit predicts them alike)
    shapes = ((0, 512), (0, 256), (256, 256), (384, 128), (448, 64))
    rows = [(n,) + costmodel.pairs(lo, lo + n, 512, True) for lo, n in shapes]
    got = probe.fit_block(rows, [truth(*r) for r in rows])
    for a, b in zip((got.fixed_s, got.per_token_s, got.per_pair_s, got.per_remote_pair_s),
                    (truth.fixed_s, truth.per_token_s, truth.per_pair_s,
                     truth.per_remote_pair_s)):
        assert a == pytest.approx(b, rel=1e-6)
    # a coefficient the data would make negative is dropped, never negative
    noisy = probe.fit_block(rows[:4], [1.0, 0.5, 0.25, 0.9])
    assert min(noisy.fixed_s, noisy.per_token_s, noisy.per_pair_s,
               noisy.per_remote_pair_s) >= 0


def test_only_the_work_between_send_and_wait_hides_under_the_link():
    """Two symmetric ranks, a link slower than the block: per layer a rank pays its
    work before the send, the link (its own local attention hides under it) and the
    rest of the block after the wait."""
    b = BlockCost(2e-3, 0.0, 0.0, 0.0)
    cost = ComputeCost(layers=5, causal=False, tokens=100, single=b, astra=b,
                       head_per_token_s=0.0, bits_per_token=8, dim=4,
                       pre=BlockCost(3e-4, 0, 0, 0), mid=BlockCost(5e-4, 0, 0, 0))
    link = LinkModel(1000, 10.0)
    dur = link.duration_s([(0, 1, costmodel._frame(cost, 50)),
                           (1, 0, costmodel._frame(cost, 50))])
    gather = link.duration_s([(1, 0, costmodel.HEADER_BYTES + 4 * cost.dim)])
    post = 2e-3 - 3e-4 - 5e-4
    total, detail = predict_astra(cost, [50, 50], [1, 1], link, detail=True)
    assert total == pytest.approx(5 * (3e-4 + dur + post) + gather)
    assert detail[0]["wait_s"] == pytest.approx(5 * (dur - 5e-4))
    # the phases never exceed the block, whatever the fit says
    big_mid = dataclasses.replace(cost, mid=BlockCost(5e-3, 0, 0, 0))
    assert big_mid.phases(50, 2500, 2500)[2] == 0.0


def test_probe_measures_a_model_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path))
    prep = catalog.prepare("tiny-gpt2", 48)
    cost = probe.compute_cost(prep.spec, prep.inputs, prep.codebooks, calibrated=False)
    assert cost.causal and cost.layers == prep.num_layers and cost.tokens == 48
    assert cost.bits_per_token > 0 and predict_single(cost) > 0
    assert all(v >= 0 for b in (cost.single, cost.astra, cost.pre, cost.mid) for v in
               (b.fixed_s, b.per_token_s, b.per_pair_s, b.per_remote_pair_s))
    # before the send nothing attends; between send and wait only the local pairs
    assert cost.pre.per_pair_s == cost.pre.per_remote_pair_s == cost.mid.per_remote_pair_s == 0
    calls = []
    monkeypatch.setattr(probe, "measure", lambda *a, **k: calls.append(1))
    again = probe.compute_cost(prep.spec, prep.inputs, prep.codebooks, calibrated=False)
    assert again == cost and not calls  # from the cache, not measured again


def test_calibration_predicts_the_runs_it_measured(tmp_path, monkeypatch):
    """The calibrated cost predicts the launch's one-device time exactly, and the 2- and
    4-rank splits' per-layer time beyond the scaled probe becomes the exchange's
    overhead (a constant plus a part per frame; never negative)."""
    monkeypatch.setenv("ASTRA_CACHE", str(tmp_path))
    prep = catalog.prepare("tiny-bert", 40)
    cb = probe._codebooks(prep.inputs, prep.codebooks)
    raw = probe.measure(prep.spec.build(), prep.inputs, cb, repeats=3)
    cost, info = probe.calibrate(prep.spec, prep.inputs, cb, raw, repeats=1)
    assert info["tokens"] == raw.tokens
    assert predict_single(cost) == pytest.approx(info["single_s"], rel=1e-9)
    assert cost.single.per_token_s == pytest.approx(info["scale"] * raw.single.per_token_s)
    assert cost.exchange_s >= 0 and cost.exchange_peer_s >= 0
    gaps = {W: max(0.0, info[f"astra{W}_gap_s"]) for W in (2, 4)}
    for W, gap in gaps.items():
        n_frames = costmodel.frames(W, causal=False)
        assert n_frames == 2 * (W - 1)  # every rank sends to and hears from all others
        # never beyond what was measured; exact when both unknowns are free
        assert cost.exchange(n_frames) <= max(gaps.values()) + 1e-12
        if cost.exchange_s > 0 and cost.exchange_peer_s > 0:  # two points, two unknowns
            assert cost.exchange(n_frames) == pytest.approx(gap, rel=1e-6, abs=1e-12)
    # compute_cost calibrates by default (one launch) and caches the calibrated cost
    launches = []
    monkeypatch.setattr(probe, "calibrate", lambda *a, **k: (launches.append(1), (cost, info))[1])
    got = probe.compute_cost(prep.spec, prep.inputs, prep.codebooks)
    assert got == cost and launches == [1]
    assert probe.compute_cost(prep.spec, prep.inputs, prep.codebooks) == cost
    assert launches == [1]


class _FakeTime:
    def __init__(self):
        self.cpu, self.slept = 0.0, []

    def thread_time(self):
        return self.cpu

    def sleep(self, s):
        self.slept.append(s)

    def monotonic(self):
        return 0.0


def test_a_slower_virtual_clock_counts_cpu_time_divided_by_speed(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(comm_mod, "time", fake)
    c = comm_mod.VirtualClock(speed=0.25)
    fake.cpu = 0.1
    assert c.now() == pytest.approx(0.4)
    c.discount(0.02)  # blocked on a transfer: not compute
    assert c.now() == pytest.approx(0.32)


def test_a_slower_wall_clock_pads_the_compute(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(comm_mod, "time", fake)
    c = comm_mod.WallClock(speed=0.5)
    fake.cpu = 0.2
    c.tick()
    assert fake.slept == [pytest.approx(0.2)]  # 0.2 s of compute takes 0.4 s
    c.discount(0.05)
    fake.cpu = 0.25
    c.tick()  # the 0.05 s blocked on a transfer is not padded
    assert len(fake.slept) == 1
    with pytest.raises(ValueError):
        comm_mod.WallClock(speed=0)


def test_a_slow_rank_slows_the_run_on_the_virtual_clock():
    prep = catalog.prepare("tiny-bert", 64)
    # a free link: the ranks' clocks meet at every exchange (without a link model each
    # rank's virtual clock counts its own CPU time only)
    job = Job("astra", prep.inputs, codebooks=prep.codebooks, output="compact",
              clock="virtual", repeats=1, warmup=1, link=LinkModel(1e6, 0.0))
    fast = summarize(launch(prep.spec, [job], 2, speeds=[1, 1])[0])
    slow = summarize(launch(prep.spec, [job], 2, speeds=[1, 0.2])[0])
    # rank 0 waits for rank 1's codes every layer: rank 1's 5x slower compute is its pace
    assert slow["latency_s"] > 2 * fast["latency_s"]


@pytest.mark.slow
def test_a_rank_that_dies_mid_prefill_is_survived_on_the_others():
    prep = catalog.prepare("tiny-bert", 40)
    # costs where splitting pays (tiny-bert's own would keep it on one device)
    cost = _cost(T=prep.content_tokens, L=2, per_token=1e-2, fixed=0.0)
    link = LinkModel(1e6, 0.0)
    first = planner.plan(cost, [1, 1, 1], link)
    assert first.devices == [0, 1, 2]
    tries = []

    def attempt(p, n):
        tries.append(list(p.devices))
        job = Job(p.strategy, prep.inputs, codebooks=prep.codebooks, chunks=p.chunks,
                  output="compact", timeout_s=20.0, fault="die:1" if n == 0 else None)
        return launch(prep.spec, [job], len(p.devices))
    res, plan, losses = run_planned(first, attempt, lambda alive: planner.plan(
        cost, [1, 1, 1], link, devices=alive), range(3))
    assert tries == [[0, 1, 2], [0, 2]] and plan.devices == [0, 2]
    assert len(losses) == 1 and losses[0].device == 1 and losses[0].rank == 1
    line = report(losses[0])
    assert line.startswith("device 1 (rank 1) was lost") and "dropped out" in line
    # the completed request is what a clean run of the same plan gives
    clean = launch(prep.spec, [Job(plan.strategy, prep.inputs, codebooks=prep.codebooks,
                                   chunks=plan.chunks, output="compact")], 2)
    assert torch.equal(res[0][0]["output"], clean[0][0]["output"])
    assert not math.isnan(float(res[0][0]["output"].float().sum()))


def test_an_error_of_its_own_is_not_survived():
    from astra.parallel.job import RunnerError
    p = planner.Plan("astra", [0, 1], [5, 5], 1.0, 2.0)

    def attempt(plan, n):
        raise RunnerError("rank 0 failed (exit 1): ValueError", lost=[])
    with pytest.raises(RunnerError, match="ValueError"):
        run_planned(p, attempt, lambda alive: p, range(2))


def test_astra_run_auto_prints_the_plan_and_the_prediction(capsys):
    from astra import cli
    assert cli.main(["run", "--model", "tiny-bert", "--tokens", "24", "--devices", "2",
                     "--repeats", "1", "--device-speeds", "1,0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: ") or "\nplan: " in out
    assert "predicted " in out and "measured " in out


def test_a_bandwidth_trace_changes_the_link_at_its_times():
    lk = LinkModel(100, 0.5, trace=[(2.0, 1.0), (5.0, 10.0)])
    assert [lk.bandwidth_at(t) for t in (None, 0.0, 1.99, 2.0, 4.0, 5.0, 9.0)] == \
        [100, 100, 100, 1.0, 1.0, 10.0, 10.0]
    plan = [(0, 1, 125_000)]  # one megabit
    assert lk.serialization_s(plan, at=3.0) == pytest.approx(1.0)
    later = lk.shifted(3.0)  # a later run continues the trace
    assert later.bandwidth_mbps == 1.0 and later.trace == ((2.0, 10.0),)
    for bad in ([(1.0, 0.0)], [(-1.0, 5.0)], [(3.0, 1.0), (1.0, 2.0)]):
        with pytest.raises(ValueError, match="bandwidth trace"):
            LinkModel(10, trace=bad)


def test_ranks_that_see_the_bandwidth_change_stop_together_to_re_plan():
    prep = catalog.prepare("tiny-bert", 32)
    job = Job("astra", prep.inputs, codebooks=prep.codebooks, output="compact",
              clock="virtual", repeats=3, warmup=0, watch_link=0.3,
              link=LinkModel(100, 0.5, trace=[(0.0, 2.0)]))
    res = launch(prep.spec, [job], 2)[0]
    for r in res:  # both ranks stopped after the first request, with the same finding
        assert len(r["times"]) == 1
        assert r["link_changed"] == dict(after_request=1, observed_mbps=2.0, planned_mbps=100.0,
                                         elapsed_s=pytest.approx(r["elapsed_s"]))
    steady = launch(prep.spec, [Job("astra", prep.inputs, codebooks=prep.codebooks,
                                    output="compact", clock="virtual", repeats=2,
                                    watch_link=0.3, link=LinkModel(100, 0.5))], 2)[0]
    assert [len(r["times"]) for r in steady] == [2, 2]
    assert all(r["link_changed"] is None for r in steady)


def test_astra_run_re_plans_the_requests_after_the_link_dropped(capsys, monkeypatch):
    from astra import cli
    # costs where splitting pays at 100 Mbit/s and not at 0.01 (tiny-bert: 23 tokens split)
    heavy = _cost(T=23, L=2, per_token=1e-2, fixed=0.0)
    monkeypatch.setattr(probe, "compute_cost", lambda *a, **k: heavy)
    assert planner.plan(heavy, [1, 1], LinkModel(100, 0.5)).strategy == "astra"
    assert planner.plan(heavy, [1, 1], LinkModel(0.01, 0.5)).strategy == "single"
    assert cli.main(["run", "--model", "tiny-bert", "--tokens", "24", "--devices", "2",
                     "--bandwidth", "100", "--bandwidth-trace", "0:0.01", "--repeats", "3",
                     "--clock", "virtual"]) == 0
    out = capsys.readouterr().out
    assert "plan: astra on devices 0,1 " in out, out
    assert "after request 1 the transfers took 0.01 Mbit/s (planned for 100): re-planned for " \
           "the 2 left: one device (0) alone" in out, out
    assert "requests (ms): " in out and " | re-planned | " in out
    assert "tiny-bert single N=1" in out


def test_bench_plan_json_keeps_the_parts_not_run(tmp_path, monkeypatch, capsys):
    import json

    from astra.bench import planning
    path = tmp_path / "planning.json"
    path.write_text(json.dumps({"grid": [{"kept": True}]}))
    rows = [dict(model="m", tokens=8, strategy="single", devices=1, predicted_ms=90.0,
                 measured_ms=100.0),
            dict(model="m", tokens=8, strategy="astra", devices=2, chunks=[4, 4],
                 bandwidth_mbps=10.0, latency_ms=0.5, predicted_ms=66.0, measured_ms=60.0)]
    monkeypatch.setattr(planning, "wall", lambda repeats: rows)
    planning.main(["wall"], str(path), None)
    out = json.loads(path.read_text())
    assert out["grid"] == [{"kept": True}] and out["wall"] == rows
    assert "prediction error median 10.0%, max 10% over 2 runs" in capsys.readouterr().out
