"""``python -m fedlora.leakage <run dir>``: membership inference and the canary audit of
a finished run; writes ``leakage.json`` and ``leakage.md`` into the run dir (and a W&B
run in the training run's project when it was tracked)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedlora.core.errors import ConfigError
from fedlora.core.files import write_atomic
from fedlora.leakage.analysis import RESULTS, TABLE, analyse, table


def log_wandb(run_dir: Path, leak_dict: dict, markdown: str) -> str | None:
    """A W&B run (job_type leakage-audit) beside the training run's, when it had one."""
    results = run_dir / "results.json"
    where = json.loads(results.read_text()).get("tracking", {}).get("wandb") if results.is_file() else None
    if not where or where.get("mode") == "disabled":
        return None
    import wandb

    from fedlora.record.tracking import resolve_mode

    quiet = wandb.Settings(silent=True, console="off")
    run = wandb.init(project=where.get("project"), entity=where.get("entity"), group=where.get("group"),
                     name=f"leakage-{where.get('run_id')}", job_type="leakage-audit", dir=str(run_dir),
                     mode=resolve_mode(where.get("mode")), config={"training_run": where.get("run_id")},
                     reinit="create_new", settings=quiet)
    flat = {f"leakage/mia/{k}/{m}": v for k in ("loss_threshold", "reference_calibrated")
            for m, v in leak_dict["membership_inference"][k].items()}
    audit = leak_dict.get("canary_audit") or {}
    if audit:
        flat["leakage/canary/epsilon_lower_bound"] = audit["epsilon_lower_bound"]
        flat["leakage/canary/max_certifiable"] = audit["max_certifiable"]
    run.summary.update(flat)
    run.log({"leakage/table": wandb.Html(f"<pre>{markdown}</pre>")})
    run.finish()
    return run.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Privacy leakage analysis of a finished run.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--examples", type=int, default=500, help="members and as many non-members")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--exposure-candidates", type=int, default=100,
                        help="causal LM: other secrets each canary's exposure is ranked among")
    args = parser.parse_args(argv)
    try:
        leak = analyse(args.run_dir, args.examples, args.batch_size, args.exposure_candidates)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = leak.to_dict()
    markdown = table(leak)
    write_atomic(args.run_dir / RESULTS, json.dumps(out, indent=2).encode())
    write_atomic(args.run_dir / TABLE, markdown.encode())
    print(markdown)
    wandb_id = log_wandb(args.run_dir, out, markdown)
    if wandb_id:
        print(f"W&B run {wandb_id} (job_type leakage-audit)")
    print(f"wrote {args.run_dir / RESULTS} and {args.run_dir / TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
