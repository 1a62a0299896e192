"""Round progress display: a bar on a terminal, the plain round lines everywhere else."""

import io
import logging

import pytest
from omegaconf import OmegaConf

from fedlora.core.errors import ConfigError
from fedlora.privacy import epsilon_from_history
from fedlora.record.progress import RoundProgress, make_progress, postfix_text
from fedlora.record.results import RunRecorder
from fedlora.record.tracking import attach_tracking


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


HISTORY = [(1.0, 0.1, 10, 1), (1.0, 0.1, 10, 2)]  # one client's spend, rounds 1 and 2


def _eps(rounds: int) -> float:
    """The epsilon the ledger gives after ``rounds`` rounds of HISTORY."""
    return epsilon_from_history([h[:3] for h in HISTORY[:rounds]], 1e-5, "rdp")


def _rounds(recorder: RunRecorder) -> None:
    recorder.on_evaluate(0, 0.69, {"accuracy": 0.5})
    for rnd in (1, 2):
        recorder.on_fit(rnd, [{"cid": 0, "accepted": True, "delta": 1e-5, "dp_history": HISTORY[:rnd]}], [], 0.01)
        recorder.on_evaluate(rnd, 0.6, {"accuracy": 0.5 + rnd / 8})


def test_not_a_terminal_keeps_the_plain_round_lines(tmp_path):
    assert make_progress({"progress": "auto"}, 2, stream=io.StringIO()) is None
    cfg = OmegaConf.create({"tracking": {"backend": "none", "progress": "auto"}})
    lines: list[str] = []
    recorder = RunRecorder(tmp_path, {}, "sample", 1e-5, 2, echo=lines.append)
    assert attach_tracking(recorder, cfg) == []  # pytest's captured stdout is no TTY
    _rounds(recorder)
    assert lines[0].startswith("round 0/2 | test accuracy 0.5000 | loss 0.6900 | ")
    assert lines[2].startswith(f"round 2/2 | test accuracy 0.7500 | loss 0.6000 | eps {_eps(2):.3f} (delta=1e-05, "
                               "sample-level, max over clients) | clients ok 1, rejected 0 | ")
    assert len(lines) == 3


def test_bar_shows_rounds_accuracy_and_epsilon_with_its_unit(tmp_path):
    stream = _Terminal()
    progress = make_progress({"progress": "auto", "name": "job 3: privacy.target_epsilon=3"}, 2, stream=stream)
    assert isinstance(progress, RoundProgress)
    recorder = RunRecorder(tmp_path, {}, "sample", 1e-5, 2, echo=lambda line: stream.write(line + "\n"))
    recorder.echo = progress.wrap_echo(recorder.echo)
    recorder.listeners.append(progress)
    _rounds(recorder)
    recorder.finalize()
    out = stream.getvalue()
    last = out.rstrip("\n").split("\r")[-1]
    # Accuracy and epsilon (with unit and delta) first, so a narrow terminal cuts the timing.
    assert last.startswith("[job 3: privacy.target_epsilon=3] round 2/2, acc 0.7500 | "
                           f"eps {_eps(2):.3f} (sample-level, delta=1e-05) |##########| ")
    # Round lines land on lines of their own, the bar cleared out of their way first.
    assert "\rround 2/2 | test accuracy 0.7500" in out
    assert progress.bar is None  # closed at the end of the run


def test_forced_modes_and_bad_mode():
    assert make_progress({"progress": "plain"}, 2, stream=_Terminal()) is None
    assert make_progress({"progress": "bar"}, 2, stream=io.StringIO()) is not None
    with pytest.raises(ConfigError) as err:
        make_progress({"progress": "fancy"}, 2, stream=io.StringIO())
    assert err.value.setting == "tracking.progress"


def test_postfix_without_dp_says_so():
    assert postfix_text({"accuracy": None}, "none", None) == "acc n/a | no DP"
    assert postfix_text({"accuracy": 0.5, "epsilon": 4.0}, "client", 1e-3) == \
        "acc 0.5000 | eps 4.000 (client-level, delta=0.001)"


def test_long_label_is_cut():
    progress = RoundProgress(2, label="job 12: " + ",".join(f"param{i}=value{i}" for i in range(9)))
    assert len(progress.label) == 40 and progress.label.endswith("...")


def test_terminal_output_goes_above_the_bar_and_is_given_back(tmp_path, monkeypatch):
    import sys

    stream = _Terminal()
    monkeypatch.setattr(sys, "stdout", stream)
    logger = logging.getLogger("flwr")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        progress = RoundProgress(2, stream=stream)
        progress.on_round({"round": 0, "accuracy": 0.5}, RunRecorder(tmp_path, {}, "none", None, 2))
        assert "emit" in handler.__dict__
        logger.warning("[ROUND 1]")
        assert "\r[ROUND 1]\n" in stream.getvalue()
        # Ray relays client output with print(): it waits for its newline, then goes above.
        print("(ClientAppActor pid=1) warn", end="")
        assert "warn" not in stream.getvalue()
        print(" more", file=sys.stderr)  # stderr is the same terminal here
        print()
        assert "\r(ClientAppActor pid=1) warn\n" in stream.getvalue()
        progress.close()
        assert "emit" not in handler.__dict__ and sys.stdout is stream
    finally:
        logger.removeHandler(handler)
