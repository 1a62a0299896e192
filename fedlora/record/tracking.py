"""Experiment tracking in Weights & Biases: one W&B run per federated experiment.

A :class:`WandbTracker` listens to the :class:`~fedlora.record.results.RunRecorder` and logs
what ``results.json`` holds: the resolved config, per round (``step=round``) the test
accuracy and loss, epsilon under a key that names its privacy unit, how many clients
took part / were accepted / rejected, aggregation time and the bytes that travelled;
at the end a per-client epsilon table and the final adapter as a ``model`` artifact.

Tracking must never stop or stall an experiment: with no W&B account configured on
the machine the run is written offline into ``<run dir>/wandb/`` (upload it later with
``wandb sync``); an online start that fails falls back to offline, and an offline start
that fails turns tracking off with one line saying why.

``attach_tracking`` is the one entry point the server uses: it adds the observers that
``tracking.*`` asks for (progress display, W&B) to a recorder.
"""

from __future__ import annotations

import atexit
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedlora.core.errors import ConfigError
from fedlora.core.units import CLIENT, LABEL, SAMPLE
from fedlora.privacy.ledger import EVERY_CLIENT
from fedlora.record.progress import PROGRESS_MODES, make_progress

BACKENDS = ("none", "wandb")
MODES = ("online", "offline", "disabled")

# The federation's epsilon under a key that says whose privacy it bounds: sample-level
# is the largest over clients (each client holds its own guarantee), client-level
# covers every client at once.
EPSILON_KEY = {SAMPLE: "privacy/epsilon_sample_level", CLIENT: "privacy/epsilon_client_level"}

CLIENT_EPSILON_COLUMNS = [
    "client", "round", "epsilon", "unit", "delta", "noise_multiplier", "sample_rate", "steps", "accepted",
]


def check_tracking(cfg: Any) -> None:
    """Refuse an unknown backend, W&B mode or progress display before the run starts."""
    tracking = cfg.get("tracking") or {}
    backend = str(tracking.get("backend", "none"))
    if backend not in BACKENDS:
        raise ConfigError("tracking.backend", f"unknown tracking backend {backend!r}; choose one of {BACKENDS}")
    mode = tracking.get("mode")
    if backend == "wandb" and mode is not None and str(mode) not in MODES:
        raise ConfigError("tracking.mode", f"unknown W&B mode {mode!r}; choose one of {MODES} or null")
    progress = str(tracking.get("progress", "auto") or "auto")
    if progress not in PROGRESS_MODES:
        raise ConfigError("tracking.progress", f"unknown progress display {progress!r}; choose one of {PROGRESS_MODES}")


def attach_tracking(recorder: Any, cfg: Any) -> list[Any]:
    """Add the observers ``cfg.tracking`` asks for to ``recorder``; returns them."""
    check_tracking(cfg)
    tracking = cfg.get("tracking") or {}
    observers: list[Any] = []
    progress = make_progress(tracking, recorder.num_rounds)
    if progress is not None:
        recorder.echo = progress.wrap_echo(recorder.echo)
        observers.append(progress)
    if str(tracking.get("backend", "none")) == "wandb":
        tracker = WandbTracker.start(recorder, tracking)
        if tracker is not None:
            observers.append(tracker)
    recorder.listeners.extend(observers)
    return observers


# -- what a round and a run become in W&B ----------------------------------------------
def round_metrics(record: dict[str, Any], privacy_unit: str) -> dict[str, Any]:
    """One round record of ``results.json`` as W&B history keys (round 0: evaluation only)."""
    metrics: dict[str, Any] = {}
    for key, name in (("accuracy", "test/accuracy"), ("loss", "test/loss"), ("perplexity", "test/perplexity"),
                      ("exact_match", "test/exact_match"), ("elapsed_s", "time/elapsed_s")):
        if record.get(key) is not None:
            metrics[name] = record[key]
    if record.get("epsilon") is not None and privacy_unit in EPSILON_KEY:
        metrics[EPSILON_KEY[privacy_unit]] = record["epsilon"]
    if "clients" in record:
        metrics["clients/participating"] = len(record["clients"])
        metrics["clients/accepted"] = record.get("num_accepted", 0)
        metrics["clients/rejected"] = record.get("num_rejected", 0)
        metrics["server/aggregation_s"] = record.get("aggregation_s", 0.0)
    for key in ("bytes_up", "bytes_down"):
        if record.get(key) is not None:
            metrics[f"traffic/{key}"] = record[key]
    return metrics


def client_epsilon_rows(recorder: Any) -> list[list[Any]]:
    """Per client and round the epsilon it had spent so far, in its unit, with delta.

    Sample-level: what each client's own accountant reported. Client-level: one row
    per round for every client (``all``), the server's guarantee after that round.
    """
    rows: list[list[Any]] = []
    for record in recorder.published_rounds():
        rnd = int(record["round"])
        for c in record.get("clients", []):
            if c.get("epsilon") is None:
                continue
            unit = str(c.get("privacy_unit", recorder.privacy_unit))
            rows.append([
                str(c["cid"]), int(rnd), float(c["epsilon"]), LABEL.get(unit, unit),
                c.get("delta", recorder.delta), c.get("noise_multiplier"), c.get("sample_rate"),
                c.get("steps"), bool(c.get("accepted")),
            ])
        dp = record.get("client_dp")
        if dp is not None and record.get("epsilon") is not None:
            rows.append([
                EVERY_CLIENT, int(rnd), float(record["epsilon"]), LABEL[CLIENT], recorder.delta,
                dp.get("noise_multiplier"), dp.get("sample_rate"), 1, True,
            ])
    return rows


def resolve_mode(configured: str | None, environ: Mapping[str, str] | None = None,
                 netrc_file: str | Path | None = None) -> str | None:
    """The W&B mode to ask for: the configured one; else None (wandb reads WANDB_MODE)
    when WANDB_MODE is set; online when W&B credentials are configured (WANDB_API_KEY or
    a netrc entry for the W&B host); else offline, which needs no account or network."""
    if configured is not None:
        return str(configured)
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return None
    if environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(netrc_file) if netrc_file else Path(environ.get("NETRC") or Path.home() / ".netrc")
    try:
        # Only whether an entry exists is looked at, never its contents.
        has_entry = path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        has_entry = False
    return "online" if has_entry else "offline"


class WandbTracker:
    """Logs one experiment into one W&B run (a RunRecorder listener).

    Parameters
    ----------
    run : wandb.Run
        The started run (see :meth:`start`).
    log_adapter : bool
        Log ``<run dir>/adapter`` as an artifact of type ``model`` at the end.
    """

    def __init__(self, run: Any, log_adapter: bool = True) -> None:
        self.run = run
        self.log_adapter = log_adapter
        self.finished = False
        # A crashed experiment still closes its W&B run, marked failed. Registered after
        # wandb.init so it runs before wandb's own exit hook (atexit is last-in first-out).
        atexit.register(self._at_exit)

    @classmethod
    def start(cls, recorder: Any, tracking: Any) -> WandbTracker | None:
        """Start the W&B run for ``recorder``'s experiment; None if W&B cannot start."""
        import wandb

        mode = resolve_mode(tracking.get("mode"))
        run_dir = Path(tracking.get("dir") or recorder.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tags = [str(t) for t in (tracking.get("tags") or [])]
        # wandb's own messages go to its debug logs; the run says where it lives below.
        quiet = wandb.Settings(silent=True, console="off", init_timeout=30)

        def init(mode_: str | None):
            wandb.setup(settings=quiet)
            return wandb.init(
                project=tracking.get("project") or "dp-federated-lora-lab",
                entity=tracking.get("entity"),
                group=tracking.get("group"),
                name=tracking.get("name"),
                tags=tags,
                job_type="federated-training",
                config=recorder.config,
                dir=str(run_dir),
                mode=mode_,
                reinit="create_new",  # several experiments in one process (a multirun)
                settings=quiet,
            )

        try:
            run = init(mode)
        except Exception as err:  # noqa: BLE001 - tracking must not stop the experiment
            if mode == "offline":
                recorder.echo(f"W&B tracking off: could not start an offline run ({err})")
                return None
            recorder.echo(f"W&B could not start {mode or 'as configured'} ({type(err).__name__}: {err}); "
                          "tracking offline instead")
            try:
                run = init("offline")
            except Exception as err2:  # noqa: BLE001
                recorder.echo(f"W&B tracking off: could not start an offline run ({err2})")
                return None
        tracker = cls(run, log_adapter=bool(tracking.get("log_adapter", True)))
        recorder.tracking["wandb"] = tracker.location()
        recorder.echo(tracker.where_text())
        return tracker

    def location(self) -> dict[str, Any]:
        """Where the W&B run lives, for ``results.json``."""
        settings = self.run.settings
        loc = {
            "run_id": self.run.id,
            "name": self.run.name,
            "project": self.run.project,
            "entity": settings.entity,
            "group": self.run.group or None,
            "mode": settings.mode,
            # A disabled run writes nothing anywhere.
            "dir": None if settings.mode == "disabled" else settings.sync_dir,
        }
        if settings.mode == "offline":
            loc["sync_command"] = f"wandb sync {settings.sync_dir}"
        elif settings.mode == "online":
            loc["url"] = self.run.url
        return loc

    def where_text(self) -> str:
        loc = self.location()
        if loc["mode"] == "offline":
            return f"W&B run {loc['run_id']} (offline) in {loc['dir']}; upload later with: {loc['sync_command']}"
        if loc["mode"] == "online":
            return f"W&B run {loc['run_id']}: {loc.get('url')}"
        return f"W&B run {loc['run_id']} ({loc['mode']})"

    # -- RunRecorder listener ----------------------------------------------------------
    def on_round(self, record: dict[str, Any], recorder: Any) -> None:
        if not self.finished:
            self.run.log(round_metrics(record, recorder.privacy_unit), step=int(record["round"]))

    def on_federated_evaluation(self, record: dict[str, Any], recorder: Any) -> None:
        """Clients' evaluation of the round (``federated/*``) and the epsilon after it."""
        if self.finished:
            return
        evaluation = record.get("federated_evaluation") or {}
        metrics = {f"federated/{k}": evaluation[k] for k in ("accuracy", "loss") if evaluation.get(k) is not None}
        if record.get("epsilon") is not None and recorder.privacy_unit in EPSILON_KEY:
            metrics[EPSILON_KEY[recorder.privacy_unit]] = record["epsilon"]
        if metrics:
            self.run.log(metrics, step=int(record["round"]))

    def on_generations(self, server_round: int, samples: list[dict[str, Any]], recorder: Any) -> None:
        """The round's sample generations as a table a person can read."""
        if self.finished:
            return
        import wandb

        rows = [[server_round, s["prompt"], s["reference"], s["generated"]] for s in samples]
        self.run.log({"test/generations": wandb.Table(columns=["round", "prompt", "reference", "generated"],
                                                       data=rows)}, step=int(server_round))

    def on_finish(self, final: dict[str, Any], recorder: Any) -> None:
        if self.finished:
            return
        try:
            self._log_final(final, recorder)
        finally:
            self.close(exit_code=0)

    def on_stop(self, stopped: dict[str, Any], recorder: Any) -> None:
        """A failed round ended the run early (resumable): the W&B run is closed as
        failed, with the reason and the epsilon table up to that round."""
        if self.finished:
            return
        import wandb

        try:
            self.run.summary.update({"stopped/reason": stopped.get("reason"),
                                     "stopped/after_round": stopped.get("after_round")})
            rows = client_epsilon_rows(recorder)
            if rows:
                self.run.log({"privacy/client_epsilon": wandb.Table(columns=CLIENT_EPSILON_COLUMNS, data=rows)})
        finally:
            self.close(exit_code=1)

    def _log_final(self, final: dict[str, Any], recorder: Any) -> None:
        import wandb

        unit = str(final.get("privacy_unit", recorder.privacy_unit))
        summary = {
            "final/accuracy": final.get("accuracy"),
            "final/loss": final.get("loss"),
            "final/rounds_completed": final.get("rounds_completed"),
            "final/wall_s": final.get("wall_s"),
            "privacy/unit": LABEL.get(unit, unit),
            "privacy/delta": final.get("delta"),
        }
        if unit in EPSILON_KEY:
            summary[f"final/{EPSILON_KEY[unit].split('/')[1]}"] = final.get("epsilon")
        for accountant, eps in (final.get("epsilon_by_accountant") or {}).items():
            summary[f"privacy/epsilon_{accountant}"] = eps
        # The audit log's head, pinned where whoever later holds the run dir cannot rewrite it
        # (python -m fedlora.record.audit checks the log against such a pin).
        pin = final.get("audit") or {}
        summary["audit/lines"], summary["audit/head_sha256"] = pin.get("line"), pin.get("sha256")
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        rows = client_epsilon_rows(recorder)
        if rows:
            self.run.log({"privacy/client_epsilon": wandb.Table(columns=CLIENT_EPSILON_COLUMNS, data=rows)})
        adapter_dir = Path(recorder.run_dir) / "adapter"
        if self.log_adapter and adapter_dir.is_dir():
            artifact = wandb.Artifact(
                name=f"adapter-{self.run.id}",
                type="model",
                description="Final LoRA adapter in PEFT format (load with PeftModel.from_pretrained).",
                metadata={
                    "base_model": (recorder.config.get("model") or {}).get("name_or_path"),
                    "accuracy": final.get("accuracy"),
                    "epsilon": final.get("epsilon"),
                    "delta": final.get("delta"),
                    "privacy_unit": LABEL.get(unit, unit),
                    "rounds": final.get("rounds_completed"),
                },
            )
            artifact.add_dir(str(adapter_dir))
            self.run.log_artifact(artifact)

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run and, when no other W&B run is active in this process,
        stop wandb's service process so nothing is left running."""
        if self.finished:
            return
        self.finished = True
        atexit.unregister(self._at_exit)
        import wandb

        try:
            self.run.finish(exit_code=exit_code)
        finally:
            # ``reinit="create_new"`` leaves wandb.run alone: if it is set, the user
            # has a run of their own open and the service must stay up for it.
            if wandb.run is None:
                wandb.teardown()

    def _at_exit(self) -> None:
        self.close(exit_code=1)
