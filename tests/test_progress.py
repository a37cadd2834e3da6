"""Progress on stderr: tqdm on a terminal, a plain line per tenth of the work anywhere else."""

from __future__ import annotations

import io

from perturbdiff_core.progress import Lines, progress_bar, stage


def test_plain_lines_at_every_tenth_and_at_the_end() -> None:
    out = io.StringIO()
    with Lines(total=1000, desc="train", unit="steps", stream=out) as bar:
        for step in range(1000):
            bar.update(1)
            if step == 449:
                bar.set_postfix({"loss": "0.5"}, refresh=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("train: 100/1000 steps (10%) ") and lines[-1].startswith("train: 1000/1000 steps (100%)")
    assert lines[3].endswith(" s") and lines[4].endswith("loss=0.5")  # the postfix from the step it was set on


def test_resumed_and_short_stages_and_iteration() -> None:
    out = io.StringIO()
    with Lines(total=50, initial=30, desc="train", unit="steps", stream=out) as bar:
        bar.update(20)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]] and "50/50 steps (100%)" in out.getvalue()
    out = io.StringIO()
    assert list(Lines(["a", "b", "c"], desc="predict", unit="conditions", stream=out)) == ["a", "b", "c"]
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "predict: 1/3 conditions", "predict: 2/3 conditions", "predict: 3/3 conditions"
    ]


def test_progress_bar_is_plain_off_a_terminal_and_silent_when_disabled(capsys) -> None:
    assert list(progress_bar(range(3), desc="x", unit="things")) == [0, 1, 2]
    assert "x: 3/3 things (100%)" in capsys.readouterr().err  # pytest's captured stderr is not a terminal
    assert list(progress_bar(range(3), desc="x", disable=True)) == [0, 1, 2]
    with progress_bar(total=5, desc="y", disable=True) as bar:
        bar.update(5)
        bar.set_postfix(loss=1)
    with stage("reading", disable=True):
        pass
    assert capsys.readouterr().err == ""
    with stage("reading"):
        pass
    assert capsys.readouterr().err.splitlines() == ["reading ...", "reading: done in 0 s"]
