"""Round progress on the terminal: a bar over rounds with the current accuracy and epsilon.

On a terminal (stdout is a TTY) a tqdm bar counts the federation's rounds and shows the
last test accuracy and the epsilon spent so far, with its unit and delta. Everywhere
else (CI logs, a captured subprocess, ``run.log``) the run prints only its plain round
lines, which tools and tests read, so they stay exactly as the recorder writes them;
on a terminal those lines are still printed, above the bar.

Under a Hydra multirun the jobs run one after another in one process; each job gets its
own bar, prefixed with its label (job number and overrides), and leaves it behind as a
one-line summary when it ends.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from fedlora.core.errors import ConfigError
from fedlora.core.units import LABEL, NONE

PROGRESS_MODES = ("auto", "bar", "plain")

# Loggers whose console output would otherwise be drawn over the bar (Flower logs every
# round to stdout).
CONSOLE_LOGGERS = ("flwr",)
FALLBACK_SIZE = (120, 24)  # columns, lines
LABEL_WIDTH = 40


def wants_bar(mode: str, stream: TextIO) -> bool:
    """``auto``: a bar only on a terminal; ``bar`` / ``plain`` force one or the other."""
    if mode not in PROGRESS_MODES:
        raise ConfigError("tracking.progress", f"unknown progress display {mode!r}; choose one of {PROGRESS_MODES}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return mode == "bar"


def postfix_text(record: dict[str, Any], privacy_unit: str, delta: float | None) -> str:
    """What the bar shows after itself: accuracy, and epsilon with its unit and delta."""
    acc = record.get("accuracy")
    parts = [f"acc {'n/a' if acc is None else f'{acc:.4f}'}"]
    if privacy_unit == NONE:
        parts.append("no DP")
    else:
        eps = record.get("epsilon")
        eps_text = "n/a" if eps is None else f"{eps:.3f}"
        parts.append(f"eps {eps_text} ({LABEL[privacy_unit]}, delta={delta:g})")
    return " | ".join(parts)


def _screen(stream: TextIO) -> dict[str, Any]:
    """Follow the terminal's size. A terminal that reports none (a pseudo-terminal whose
    size was never set, e.g. ``docker run -t``) reads as 0 x 0, for which tqdm draws
    nothing at all, so it gets a fixed size."""
    try:
        size = os.get_terminal_size(stream.fileno())
        if size.columns > 0 and size.lines > 0:
            return {"dynamic_ncols": True}
    except (AttributeError, OSError, ValueError):
        pass
    return {"ncols": FALLBACK_SIZE[0], "nrows": FALLBACK_SIZE[1]}


class _AboveBar:
    """A stand-in for ``sys.stdout`` / ``sys.stderr`` while the bar is shown: whole lines
    are written above the bar (Ray's relayed client output, warnings, prints); a partial
    line waits for its newline so it never lands inside the bar."""

    def __init__(self, wrapped: TextIO, bar_stream: TextIO) -> None:
        self.wrapped = wrapped
        self._bar_stream = bar_stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            with tqdm.external_write_mode(file=self._bar_stream):
                self.wrapped.write(lines + "\n")
                self.wrapped.flush()
        return len(text)

    def flush(self) -> None:
        self.wrapped.flush()

    def release(self) -> None:
        if self._pending:
            self.wrapped.write(self._pending)
            self._pending = ""
        self.wrapped.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class RoundProgress:
    """A RunRecorder listener that draws a progress bar over the federation's rounds.

    While the bar is shown, everything else written to the terminal (the round lines,
    Flower's log, Ray's relayed client output) is written above it, so the bar stays
    the last line and is never torn by another line.

    Parameters
    ----------
    num_rounds : int
        Rounds planned for the run (the bar's total).
    label : str, optional
        Shown in front of the bar: under a multirun, the job number and its overrides
        (cut to ``LABEL_WIDTH`` characters).
    stream : file, optional
        Where the bar is drawn; default ``sys.stdout``.
    """

    def __init__(self, num_rounds: int, label: str | None = None, stream: TextIO | None = None) -> None:
        self.num_rounds = int(num_rounds)
        if label and len(label) > LABEL_WIDTH:
            label = label[: LABEL_WIDTH - 3] + "..."
        self.label = label
        self.stream = stream if stream is not None else sys.stdout
        self.bar: tqdm | None = None
        self._patched: list[logging.Handler] = []
        self._swapped: dict[str, _AboveBar] = {}

    def wrap_echo(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """``echo`` that lifts the bar out of the way, so a line never lands inside it."""

        def echo_above_bar(line: str) -> None:
            if self.bar is None:
                echo(line)
                return
            with tqdm.external_write_mode(file=self.stream):
                echo(line)

        return echo_above_bar

    def _open(self, done: int, postfix: str) -> None:
        # Opened at the first evaluated round, not before: the lines printed while the
        # model loads and the federation starts come out as plain lines. ``done`` is
        # not 0 after a resume. Accuracy and epsilon come right after the round count,
        # so a narrow terminal cuts the timing off, not them.
        self.bar = tqdm(
            total=self.num_rounds,
            initial=done,
            postfix=postfix,
            desc=f"[{self.label}] " if self.label else "",
            unit="round",
            file=self.stream,
            leave=True,
            **_screen(self.stream),
            bar_format="{desc}round {n_fmt}/{total_fmt}{postfix} |{bar}| {elapsed}<{remaining}",
        )
        self._route_console_logs()
        self._route_std_streams()

    def _route_console_logs(self) -> None:
        """Flower's console log lines go above the bar too, keeping Flower's own format."""
        terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        for name in CONSOLE_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if not isinstance(handler, logging.StreamHandler) or handler.stream not in terminal:
                    continue
                emit = handler.emit

                def emit_above_bar(record: logging.LogRecord, _emit=emit) -> None:
                    with tqdm.external_write_mode(file=self.stream):
                        _emit(record)

                handler.emit = emit_above_bar  # instance attribute; removed in close()
                self._patched.append(handler)

    def _route_std_streams(self) -> None:
        # Only when the bar is on the real terminal: a bar drawn elsewhere (a test's
        # buffer) has nothing to protect on stdout / stderr.
        if self.stream not in (sys.stdout, sys.__stdout__):
            return
        for name in ("stdout", "stderr"):
            self._swapped[name] = _AboveBar(getattr(sys, name), self.stream)
            setattr(sys, name, self._swapped[name])

    def on_round(self, record: dict[str, Any], recorder: Any) -> None:
        done = min(int(record["round"]), self.num_rounds)
        postfix = postfix_text(record, recorder.privacy_unit, recorder.delta)
        if self.bar is None:
            self._open(done, postfix)
            return
        self.bar.n = done
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.refresh()

    def on_finish(self, final: dict[str, Any], recorder: Any) -> None:
        self.close()

    def on_stop(self, stopped: dict[str, Any], recorder: Any) -> None:
        self.close()

    def close(self) -> None:
        """Leave the bar as it stands and give the terminal streams and Flower's
        console logging back."""
        for handler in self._patched:
            handler.__dict__.pop("emit", None)
        self._patched = []
        for name, proxy in self._swapped.items():
            if getattr(sys, name) is proxy:
                setattr(sys, name, proxy.wrapped)
            proxy.release()
        self._swapped = {}
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_progress(tracking: Any, num_rounds: int, stream: TextIO | None = None) -> RoundProgress | None:
    """The bar for ``tracking.progress`` (auto | bar | plain), or None for plain lines."""
    stream = stream if stream is not None else sys.stdout
    mode = str(tracking.get("progress", "auto") or "auto")
    if not wants_bar(mode, stream):
        return None
    label = tracking.get("name")
    return RoundProgress(num_rounds, label=str(label) if label else None, stream=stream)
