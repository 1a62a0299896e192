"""Run one federated experiment as a Flower simulation (Hydra entry point).

    python -m simulations.run                               # the default experiment
    python -m simulations.run privacy=none federation.rounds=3
    python -m simulations.run -m privacy.target_epsilon=1,3,8

Writes into the Hydra run directory: ``results.json``, ``config.yaml`` (resolved),
``adapter/`` (PEFT format) and the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.core.env import set_defaults

set_defaults()  # before Flower, Ray and Hugging Face read them

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from fedlora.client.state import CLIENT_STATE_DIR  # noqa: E402
from fedlora.core.config import plain_config  # noqa: E402
from fedlora.core.errors import ConfigError  # noqa: E402
from fedlora.record.checkpoint import resume_commands, run_config  # noqa: E402
from fedlora.record.results import epsilon_text  # noqa: E402
from strategies.preflight import backend_cpus, preflight  # noqa: E402

log = logging.getLogger("simulations.run")


def _echo(line: str) -> None:
    print(line, flush=True)
    log.info(line)


def resume_config(cfg: Any, run_dir: Path) -> tuple[Any, Path]:
    """The run dir and config of a run to continue (its own resolved config.yaml)."""
    if isinstance(cfg.resume, str) and cfg.resume.lower() not in ("true", "false"):
        run_dir = Path(cfg.resume)
    return run_config(run_dir), run_dir


def job_labels(hydra_cfg: Any) -> dict[str, str]:
    """Tracking name and group of this Hydra job: a multirun's jobs share one group (the
    sweep dir) and are named by job number and overrides; a single run by its overrides."""
    overrides = str(hydra_cfg.job.override_dirname or "")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        name = f"job {hydra_cfg.job.num}" + (f": {overrides}" if overrides else "")
        return {"group": str(hydra_cfg.sweep.dir), "name": name}
    return {"name": overrides} if overrides else {}


def with_job_labels(cfg: DictConfig, labels: dict[str, str]) -> DictConfig:
    """Fill ``tracking.name`` / ``tracking.group`` where the user left them null."""
    with open_dict(cfg):
        for key, value in labels.items():
            if cfg.tracking.get(key) is None:
                cfg.tracking[key] = value
    return cfg


def run_experiment(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Preflight, then a Flower simulation; returns the ``final`` block of results.json."""
    from flwr.simulation import run_simulation

    from fedlora.client.app import make_client_app
    from strategies.server_app import make_server_app

    cfg = plain_config(cfg)
    resume = bool(cfg.get("resume"))
    if resume:
        cfg, run_dir = resume_config(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    plan = preflight(cfg)
    if not resume:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    _echo(banner(plan))
    server_app = make_server_app(plan, run_dir, echo=_echo, resume=resume)
    # Simulated clients keep their own spend records in the run dir (in deployment: on
    # each node's own disk).
    client_app = make_client_app(plan, state_dir=run_dir / CLIENT_STATE_DIR)
    fed = cfg.federation
    res = fed.client_resources
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(fed.num_clients),
        backend_config={
            "client_resources": {"num_cpus": float(res.num_cpus), "num_gpus": float(res.num_gpus)},
            "init_args": {
                "num_cpus": backend_cpus(cfg),
                "include_dashboard": False,
                "logging_level": "error",
            },
        },
    )
    results = json.loads((run_dir / "results.json").read_text())
    final = results.get("final") or {}
    if not final:
        raise RuntimeError(f"the server did not finish; see {run_dir}")
    final["wall_s_total"] = round(time.time() - start, 1)
    final["run_dir"] = str(run_dir)
    return final


def banner(plan: Any) -> str:
    """The run's first line: federation, data, model and privacy plan."""
    cfg, fed = plan.cfg, plan.cfg.federation
    meta = plan.task_data().meta
    dp = [c.dp for c in plan.clients if c.dp is not None]
    if dp:
        privacy = (f"sample-level DP: target eps={cfg.privacy.target_epsilon}, delta={cfg.privacy.delta}, "
                   f"noise multiplier {min(p.noise_multiplier for p in dp):.3f}-"
                   f"{max(p.noise_multiplier for p in dp):.3f}, q~{dp[0].sample_rate:.3f}, "
                   f"{dp[0].steps_per_round} steps/round")
    else:
        privacy = client_dp_text(plan.client_dp) if plan.client_dp else "no DP"
    return (f"{fed.num_clients} clients x {fed.rounds} rounds | {cfg.data.name}: {meta['num_train']} train / "
            f"{meta['num_test']} test | model {cfg.model.name_or_path} | LoRA r={cfg.lora.r}"
            f"{' (FFA)' if cfg.lora.freeze_a else ''} | {privacy}")


def client_dp_text(plan: Any) -> str:
    return (
        f"client-level DP: target eps={plan.target_epsilon}, delta={plan.delta}, noise multiplier "
        f"{plan.noise_multiplier:.3f}, clipping norm {plan.clipping_norm}, Poisson client sampling "
        f"q={plan.sample_rate:g} (~{plan.expected_clients:.1f} clients/round)"
    )


def final_line(final: dict[str, Any]) -> str:
    acc = final.get("accuracy")
    acc_text = "n/a" if acc is None else f"{acc:.4f}"
    privacy = epsilon_text(final.get("epsilon"), final.get("delta"), str(final.get("privacy_unit")))
    return (
        f"FINAL test accuracy = {acc_text} | {privacy} | rounds = {final.get('rounds_completed')} "
        f"| wall time = {final.get('wall_s_total', final.get('wall_s'))}s"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    cfg = with_job_labels(cfg, job_labels(hydra_cfg))
    from strategies.fedlora_strategy import RoundFailed

    try:
        final = run_experiment(cfg, run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        log.error("config error: %s", err)
        sys.exit(2)
    except RoundFailed as err:
        stopped_in = Path(cfg.resume) if isinstance(cfg.resume, str) and cfg.resume.lower() not in ("true", "false") else run_dir
        print(f"error: {err}. The run stopped after checkpointing; continue it with {resume_commands(stopped_in)}",
              file=sys.stderr, flush=True)
        log.error("run stopped: %s", err)
        sys.exit(3)
    _echo(final_line(final))
    _echo(f"run dir: {final['run_dir']}")


if __name__ == "__main__":
    main()
