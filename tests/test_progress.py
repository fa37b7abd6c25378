"""Progress off a terminal: a line per phase (start, at most one per interval, end), never silence."""

import io

import torch

import saelab
from saelab.progress import PhaseLines, bar


def test_off_a_terminal_a_phase_prints_start_progress_and_end_lines():
    stream = io.StringIO()
    b = bar(total=4, desc="harvest", unit="tok", every_s=0.0, stream=stream)
    assert isinstance(b, PhaseLines)
    for _ in range(4):
        b.update(1)
    b.set_postfix({"L0": "3.0"})
    b.close()
    b.close()  # closing twice prints once
    lines = stream.getvalue().splitlines()
    assert lines[0] == "harvest: started of 4 tok"
    assert lines[1].startswith("harvest: 1/4 tok, ") and "ETA" in lines[1]
    assert lines[-1].startswith("harvest: done, 4 tok in ") and lines[-1].endswith("tok/s)")
    assert len(lines) == 6


def test_iterating_and_disabled_bars():
    stream = io.StringIO()
    assert list(bar([1, 2, 3], desc="contexts", unit="batch", stream=stream)) == [1, 2, 3]
    text = stream.getvalue()
    assert "contexts: started of 3 batch" in text and "contexts: done, 3 batch" in text
    quiet = io.StringIO()
    assert list(bar([1, 2], desc="x", enabled=False, stream=quiet)) == [1, 2]
    assert quiet.getvalue() == ""


def test_training_logs_its_phase_when_stderr_is_not_a_terminal(capsys):
    data = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(30)]
    saelab.train({"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2}, data, {"steps": 10})
    err = capsys.readouterr().err
    assert "topk: started of 10 step" in err and "topk: done, 10 step in" in err
