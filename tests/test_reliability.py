"""astra.bench.reliability: quality against lost codes through the real runner (the
``"nll"`` output against HF's own loss), and the fault table's rows."""
import math

import pytest
import torch

from astra import catalog
from astra.bench import reliability
from astra.parallel.job import Job
from astra.parallel.launcher import launch


def test_nll_output_is_hf_loss_and_the_loss_table_counts_what_was_lost():
    prep = catalog.prepare("tiny-gpt2", 40, G=1, K=16)
    with torch.no_grad():
        hf = prep.spec.build()(prep.inputs, labels=prep.inputs).loss
    # one launch: one device's "nll" output and astra's at 0 and 50% loss, 0-1 resends
    rows = reliability.quality_vs_loss("tiny-gpt2", devices=2, tokens=40, losses=(0.0, 0.5),
                                       mtus=(2,), seeds=(0, 1), quiet=True)
    by = {(r["resend"], r["loss"]): r for r in rows}
    assert sorted(by) == [(0, 0.0), (0, 0.5), (1, 0.5)]
    assert by[0, 0.0]["lost_fraction"] == 0.0 and by[0, 0.0]["cost_vs_no_loss"] == 0.0
    assert by[0, 0.0]["quality_single"] == pytest.approx(math.exp(float(hf)), rel=1e-5)
    assert 0.3 < by[0, 0.5]["lost_fraction"] < 0.8  # about one token per 2-byte packet
    # one resend round: a packet stays lost with probability 0.5 ** 2 (few packets here)
    assert 0.05 < by[1, 0.5]["lost_fraction"] < by[0, 0.5]["lost_fraction"] - 0.1
    assert by[0, 0.5]["seeds"] == 2 and by[0, 0.5]["metric"] == "perplexity"
    assert by[0, 0.5]["quality"] != by[0, 0.0]["quality"]  # the losses changed the output


def test_nll_needs_a_causal_lm():
    from astra.parallel.job import RunnerError
    prep = catalog.prepare("tiny-bert", 20, with_codebooks=False)
    with pytest.raises(RunnerError, match="output must be 'full', 'compact' or"):
        launch(prep.spec, [Job("single", prep.inputs, output="nll")], 1)


@pytest.mark.slow
def test_fault_rows_time_the_fault_and_leave_nothing():
    row = reliability._launch_fault("die:1", 2, 5.0)
    assert row["message"].startswith("rank 1 dropped out (exit 3: died without an error)")
    assert row["leftovers"] == 0 and 0 <= row["seconds"] < 60
