"""Flower ServerApp: our strategy inside Flower's DefaultWorkflow with a LegacyContext.

The compatibility workflow is used (not the Message-API strategies) because Flower's
SecAgg+ runs only there. The server keeps the test split for centralized evaluation
every round, records the run, and saves the final adapter in PEFT format.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from logging import ERROR
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import log
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from omegaconf import OmegaConf

from fedlora.core.config import OVERRIDES_FILE, compose_overrides, plain_config, seed_for
from fedlora.core.errors import ConfigError
from fedlora.core.units import NONE, SAMPLE
from fedlora.models.lora import get_arrays, set_arrays
from fedlora.plan import ExperimentPlan, aggregator_name, aggregator_params
from fedlora.privacy.evaluation import DP
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.release import hide_participation_in_logs
from fedlora.record.audit import AuditTrail
from fedlora.record.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.record.checkpoint import run_config as load_run_config
from fedlora.record.model_card import write_model_card
from fedlora.record.plots import RunPlots
from fedlora.record.results import RunRecorder
from fedlora.record.tracking import attach_tracking
from fedlora.tasks.runtime import get_bundle
from strategies.async_server import ASYNC, SYNC, AsyncSettings, FedBuffServer
from strategies.client_dp import ClientLevelDP
from strategies.deadline import RoundDeadline
from strategies.fedlora_strategy import FedLoRAStrategy, RoundFailed
from strategies.preflight import preflight
from strategies.secagg import secagg_workflow
from strategies.server_optimizers import from_config as server_optimizer
from strategies.weighting import client_weights


ASYNC_SALT = 0xA5C


def _save(run_dir: Path, strategy: FedLoRAStrategy, recorder: RunRecorder, server_round: int) -> None:
    """Checkpoint after every round, and when a round starts (the checkpoint then marks
    it started: a resume never runs it again); the privacy ledger travels with the adapter."""
    ckpt = strategy.checkpoint(server_round)
    ckpt.state["privacy_ledger"] = recorder.ledger.to_dict()
    save_checkpoint(Path(run_dir) / CHECKPOINT, ckpt)


def _recorder(plan: ExperimentPlan, run_dir: Path, echo, ckpt: Checkpoint | None) -> tuple[RunRecorder, AuditTrail]:
    """The run record with its listeners: audit log, plots, tracking (progress, W&B)."""
    cfg = plan.cfg
    private = plan.unit != NONE
    recorder = RunRecorder(
        run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        privacy_unit=plan.unit,
        delta=float(cfg.privacy.delta) if private else None,
        num_rounds=int(cfg.federation.rounds),
        accountant=str(cfg.privacy.get("accountant", "rdp")),
        echo=echo,
        noise=plan.noise.describe() if private else {"source": "none"},
        experiment_id=str(ckpt.state.get("experiment_id", "")) if ckpt is not None else uuid.uuid4().hex,
        release=plan.release,
    )
    recorder.attack = {**OmegaConf.to_container(cfg.attack, resolve=True), "clients": list(plan.malicious)}
    # audit.jsonl (append-only, hash-chained) and the PNG plots, after every round.
    audit = AuditTrail(run_dir, recorder.config)
    recorder.listeners += [audit, RunPlots(run_dir)]
    attach_tracking(recorder, cfg)  # progress display, W&B run (tracking.*)
    return recorder, audit


def _fraction_evaluate(plan: ExperimentPlan, echo) -> float:
    """The fraction of clients asked to evaluate, with a line on what that releases
    (``privacy.evaluation``): under DP, ``plain`` is not covered by the run's epsilon."""
    fraction = float(plan.cfg.federation.fraction_evaluate)
    release = plan.release
    if str(plan.cfg.federation.get("mode") or SYNC) == ASYNC:
        return 0.0  # the asynchronous loop evaluates on the server's test split only (said at its start)
    if fraction > 0 and not release.client_evaluation:
        echo("federated evaluation is off (privacy.evaluation=off): clients release nothing about their "
             "validation data; the server's test split is evaluated every round")
        return 0.0
    if fraction > 0 and not release.evaluation_covered:
        echo("WARNING: privacy.evaluation=plain: clients send their validation loss and accuracy in the clear; "
             "these client metrics are NOT covered by the run's differential-privacy guarantee. Use "
             "privacy.evaluation=dp (noisy counts, in the ledger) or off")
    elif fraction > 0 and release.evaluation == DP:
        echo("federated evaluation: privacy.evaluation=dp, clients release Gaussian-noised correct and example "
             "counts, composed into their epsilon (privacy.evaluation_epsilon_fraction of each budget is reserved)")
    return fraction


def run_server(
    grid: Grid, context: Context, plan: ExperimentPlan, run_dir: Path, echo=print, resume: bool = False,
    simulation: bool = False,
) -> dict[str, Any]:
    """Run the federation of ``plan``; with ``resume`` continue after the run dir's
    checkpoint. In a ``simulation`` rounds close on the simulated clock."""
    cfg, fed = plan.cfg, plan.cfg.federation
    task = plan.task_data()
    bundle = get_bundle(cfg, plan.num_labels)
    test = plan.task.encode_eval(task.test, bundle.tokenizer, cfg.model, list(plan.label_names))
    generation = cfg.model.get("generation") or {}

    def evaluate_fn(server_round: int, arrays):
        set_arrays(bundle.model, bundle.names, arrays)
        metrics = plan.task.evaluate(bundle.model, test, int(cfg.train.eval_batch_size), str(cfg.train.precision))
        generated = plan.task.generations(bundle.model, bundle.tokenizer, test, int(generation.get("examples") or 0),
                                          int(generation.get("max_new_tokens") or 16))
        if generated is not None:
            metrics["exact_match"], samples = generated
            recorder.on_generations(server_round, samples)
        return metrics.pop("loss"), metrics

    ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT) if resume else None
    recorder, audit = _recorder(plan, run_dir, echo, ckpt)
    if plan.unit != NONE and not plan.noise.private:
        echo(f"WARNING: {plan.noise.warning()}")
    strategy = FedLoRAStrategy(
        initial_arrays=get_arrays(bundle.model, bundle.names),
        aggregator=aggregator_name(cfg.strategy),
        aggregator_params=aggregator_params(cfg.strategy),
        norm_bound=cfg.strategy.get("norm_bound"),
        server_optimizer=server_optimizer(cfg.strategy),
        fraction_fit=float(fed.fraction_fit),
        fraction_evaluate=_fraction_evaluate(plan, echo),
        min_fit_clients=int(fed.min_fit_clients),
        min_evaluate_clients=int(fed.min_evaluate_clients),
        min_available_clients=int(fed.min_available_clients),
        evaluate_fn=evaluate_fn,
        recorder=recorder,
        experiment_id=recorder.experiment_id,
        on_round_start=lambda server_round, strat: _save(run_dir, strat, recorder, strat.completed_round),
        on_round_end=lambda server_round, strat: _save(run_dir, strat, recorder, server_round),
        min_fit_results=plan.min_fit_results,
        evaluation=plan.release.evaluation,
        codec=plan.codec,
        selection=str(fed.get("selection") or "uniform"),
        selection_candidates=fed.get("selection_candidates"),
        ranks=plan.ranks,
        layout=bundle.layout,
        profiles=plan.profiles,
        weighting=client_weights(cfg.strategy, {c.client: c.num_examples for c in plan.clients}),
        over_selection=float(fed.get("over_selection") or 0.0),
        planned_spend=plan.planned_round_spend,
    )
    if plan.client_dp is not None:
        strategy = ClientLevelDP(strategy, plan.client_dp, plan.noise)
    remaining = int(fed.rounds)
    if ckpt is not None:
        remaining = _restore(strategy, recorder, ckpt, run_dir, echo)
    else:
        # Round 0: a crash before the first round ends is resumable too.
        _save(run_dir, strategy, recorder, 0)
    audit.start(recorder)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
    fit_workflow = None
    if plan.secagg is not None:
        settings = plan.secagg
        fit_workflow = secagg_workflow(settings, client_dp=plan.client_dp is not None)
        # A public bound, from the settings alone (no client reports its own error).
        echo(f"SecAgg+: deltas clipped to L2 norm {settings.clipping_norm:g} before masking; quantization error "
             f"< {settings.quantization_step:.2e} per coordinate of each weighted delta (one of "
             f"{settings.quantization_range} levels)")
    # Under client-level DP Flower's own log lines must not count the participants.
    log_filter = None if plan.release.participation_public else hide_participation_in_logs()
    timeout = fed.get("round_timeout_s")
    asynchronous = str(fed.get("mode") or SYNC) == ASYNC
    if not asynchronous and fit_workflow is None and (simulation or timeout is not None or strategy.over_selection > 0):
        # Rounds close at the target (over-selection) or the deadline, not at the last
        # straggler; a simulation's rounds are timed on the simulated clock.
        grid = RoundDeadline(grid, timeout, lambda: strategy.round_quorum, strategy.cut_off, simulated=simulation,
                             on_closed=strategy.round_closed)
    try:
        if asynchronous:
            _run_async(grid, strategy, plan, remaining, resumed=ckpt is not None, simulation=simulation, echo=echo)
        else:
            DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    except RoundFailed as err:
        # Recorded and checkpointed already: stop here, resumable.
        recorder.stop(str(err))
        raise
    finally:
        if log_filter is not None:
            logging.getLogger("flwr").removeFilter(log_filter)

    set_arrays(bundle.model, bundle.names, strategy.global_arrays)
    adapter_dir = Path(run_dir) / "adapter"
    plan.task.export(bundle.model, adapter_dir, cfg.model, list(plan.label_names))
    write_model_card(adapter_dir, recorder.privacy_statement(), plan)
    return recorder.finalize(
        num_clients=plan.num_clients,
        trainable_parameters=int(sum(a.size for a in strategy.global_arrays)),
        label_names=list(plan.label_names),
    )


def _run_async(grid: Grid, strategy: FedLoRAStrategy, plan: ExperimentPlan, remaining: int, resumed: bool,
               simulation: bool, echo) -> None:
    """``federation.mode=async``: FedBuff (:mod:`strategies.async_server`) for the versions left."""
    fed = plan.cfg.federation
    settings = AsyncSettings.from_config(fed, plan.clients_per_round)
    echo(f"asynchronous (FedBuff): {settings.concurrency} clients training at a time, a global step every "
         f"{settings.buffer_size} updates, max staleness {settings.max_staleness}; the server's test split is "
         "evaluated after every step (no federated evaluation)")
    # Nodes connect asynchronously (SuperNodes, simulation actors): wait for the minimum.
    deadline = time.monotonic() + 600
    while len(list(grid.get_node_ids())) < int(fed.min_available_clients) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not resumed:
        strategy.evaluate(0, None)
    FedBuffServer(grid, strategy, settings, strategy.round_offset + remaining, simulated=simulation,
                  seed=seed_for(int(plan.cfg.seed), ASYNC_SALT)).run()


def _restore(strategy: FedLoRAStrategy, recorder: RunRecorder, ckpt: Checkpoint, run_dir: Path, echo) -> int:
    """Continue after the checkpoint: strategy state, results and the (never reset)
    ledger; returns the rounds left."""
    strategy.restore(ckpt)
    results_path = Path(run_dir) / "results.json"
    recorder.restore(
        json.loads(results_path.read_text()) if results_path.is_file() else {},
        PrivacyLedger.from_dict(ckpt.state.get("privacy_ledger", {})),
        ckpt.round,
    )
    strategy.pending_histories = recorder.ledger.client_histories(SAMPLE)
    remaining = recorder.num_rounds - strategy.round_offset
    skipped = strategy.round_offset - ckpt.round
    echo(f"resuming after round {ckpt.round}: {remaining} round(s) left"
         + (f" (round {strategy.round_offset} had started, so its clients may have spent budget: it is "
            "not run again)" if skipped else ""))
    return remaining


def make_server_app(plan: ExperimentPlan, run_dir: Path, echo=print, resume: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, plan, run_dir, echo, resume, simulation=True)

    return app


def deployed_config(run_config: dict[str, Any], run_id: int) -> tuple[Any, Path, bool]:
    """Config, run dir and resume flag of a ``flwr run``: the run config's Hydra
    overrides composed on the same ``conf/`` tree as simulations. To resume, the
    overrides must give the run dir's own config.yaml (the ClientApps compose the same
    overrides, so a different config would train different clients). The run dir comes
    from the submitter and the ServerApp writes as the SuperLink's user, so it must lie
    under the SuperLink's runs root (``FEDLORA_RUNS_ROOT``, default ./outputs), checked
    before anything is read or written. Bad input raises ConfigError naming the fix."""
    from fedlora.deploy.runs import confine_run_dir, runs_root

    run_dir = confine_run_dir(str(run_config.get("run-dir", "") or f"flwr-run-{run_id}"), runs_root())
    resume = bool(run_config.get("resume", False))
    overrides = str(run_config.get("overrides", ""))
    cfg = compose_overrides(overrides)
    if resume:
        saved = plain_config(load_run_config(run_dir))
        strip = lambda c: {k: v for k, v in OmegaConf.to_container(c).items() if k != "resume"}  # noqa: E731
        if strip(saved) != strip(cfg):
            original = (run_dir / OVERRIDES_FILE).read_text().strip() if (run_dir / OVERRIDES_FILE).is_file() else "?"
            raise ConfigError(
                "overrides", f"resuming {run_dir} needs the overrides it started with ({original!r}), "
                f"got {overrides!r}"
            )
        return saved, run_dir, True
    return cfg, run_dir, False


# `flwr run .` entry point (pyproject [tool.flwr.app.components]).
app = ServerApp()


@app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    try:
        cfg, run_dir, resume = deployed_config(dict(context.run_config), context.run_id)
        # The same checks as a simulation, before any SuperNode trains; the plan they
        # return is the one every ClientApp rebuilds from the same overrides.
        plan = preflight(cfg, simulation=False)
    except ConfigError as err:
        log(ERROR, "error: %s", err)
        raise RuntimeError(f"error: {err}") from None
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (run_dir / OVERRIDES_FILE).write_text(str(context.run_config.get("overrides", "")) + "\n")
    try:
        run_server(grid, context, plan, run_dir, resume=resume)
    except RoundFailed as err:
        message = (f"{err}. The run stopped after checkpointing; continue it with `python -m "
                   f"fedlora.deploy run --resume --run-dir {run_dir} --connection <name>`")
        log(ERROR, "%s", message)
        raise RuntimeError(message) from None
