"""The leakage analysis of a finished run: membership inference on its final model and
the one-run canary audit, beside the accountant's epsilon.

Members are training examples of the clients (their own rows, canaries excluded),
non-members held-out test examples of the same distribution, as many of each. The
reference model of the calibrated attack is the run's starting point: the base model
with the adapter switched off (PEFT's ``disable_adapter``), i.e. the initial global model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedlora.core.errors import ConfigError
from fedlora.leakage import mia, one_run
from fedlora.leakage.canaries import exposure, secret_alternatives
from fedlora.plan import ExperimentPlan, build_plan

RESULTS = "leakage.json"
TABLE = "leakage.md"


@torch.no_grad()
def losses(task: Any, model: torch.nn.Module, data: Any, batch_size: int,
           reference: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(final, reference) per-example losses over ``data``: with the run's adapter and
    with it switched off (None without ``reference``)."""
    model.eval()
    final, ref = [], []
    for batch in DataLoader(data, batch_size=batch_size):
        final.append(task.per_example_loss(model, batch).float().cpu())
        if reference:
            with model.disable_adapter():
                ref.append(task.per_example_loss(model, batch).float().cpu())
    return _cat(final), _cat(ref) if reference else None


def _cat(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(parts).numpy().astype(float)


@dataclass
class Leakage:
    """What the tool found, as written to leakage.json."""

    run_dir: str
    accountant: dict[str, Any]
    membership: dict[str, Any]
    canary_audit: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "accountant": self.accountant, "membership_inference": self.membership,
                "canary_audit": self.canary_audit, "notes": self.notes}


def accountant_of(results: dict[str, Any], cfg: Any) -> dict[str, Any]:
    final = results.get("final") or {}
    eps = final.get("epsilon")
    unit = final.get("privacy_unit")
    unit = "no DP" if unit in (None, "none") else unit
    delta = final.get("delta")
    if delta is None:
        delta = float((cfg.get("privacy") or {}).get("delta") or 1e-5)
    return {"epsilon": eps, "delta": float(delta), "privacy_unit": unit}


def member_rows(plan: ExperimentPlan, count: int, seed: int) -> tuple[Any, Any]:
    """(members, non-members): ``count`` of the clients' training rows and as many test rows."""
    data = plan.task_data()
    pool = np.concatenate([c.train_indices for c in plan.clients])
    n = min(count, len(pool), len(data.test))
    if n < 2:
        raise ConfigError("--examples", f"membership inference needs at least 2 members and 2 non-members; "
                          f"the run has {len(pool)} training and {len(data.test)} test rows")
    rng = np.random.default_rng([seed, 0x319])
    members = data.train.select(sorted(rng.choice(pool, n, replace=False).tolist()))
    non_members = data.test.select(sorted(rng.choice(len(data.test), n, replace=False).tolist()))
    return members, non_members


def analyse(run_dir: Path | str, examples: int = 500, batch_size: int = 32, exposure_candidates: int = 100,
            confidence: float = 0.95) -> Leakage:
    """Run the attacks on ``run_dir``'s final model (see the module docstring)."""
    from fedlora.predict import run_config

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    plan = build_plan(cfg)
    task = plan.task
    tokenizer, model, _ = task.load_trained(run_dir, cfg)
    accountant = accountant_of(results, cfg)

    def encode(rows):
        return task.encode(rows, tokenizer, cfg.model)

    members, non_members = member_rows(plan, examples, int(cfg.seed))
    f_in, r_in = losses(task, model, encode(members), batch_size)
    f_out, r_out = losses(task, model, encode(non_members), batch_size)
    y = np.r_[np.ones(len(f_in), bool), np.zeros(len(f_out), bool)]
    final, ref = np.r_[f_in, f_out], np.r_[r_in, r_out]
    membership = {
        "loss_threshold": mia.summary(-final, y),
        "reference_calibrated": mia.summary(ref - final, y),
        "mean_loss_members": float(f_in.mean()), "mean_loss_non_members": float(f_out.mean()),
    }

    notes: list[str] = []
    audit = None
    canaries = plan.canaries
    if canaries is None:
        notes.append("no canary audit: the run has no canaries; run it with audit.canaries=m (e.g. 200)")
    else:
        f_c, r_c = losses(task, model, encode(canaries.rows), batch_size)
        result = one_run.audit(r_c - f_c, canaries.included, accountant["delta"], confidence)
        audit = {**result.to_dict(), "score": "reference-calibrated loss",
                 "privacy_unit": "sample-level (one canary example in one client's data)",
                 "audit_clients": sorted({int(h) for h in canaries.holder})}
        if "response" in canaries.rows.column_names and exposure_candidates > 0:
            exp = []
            for i in range(canaries.count):
                alt = secret_alternatives(canaries.rows[i], exposure_candidates, int(cfg.seed) + i)
                alt_loss, _ = losses(task, model, encode(alt), batch_size, reference=False)
                exp.append(exposure(float(f_c[i]), alt_loss))
            exp = np.asarray(exp)
            audit["exposure"] = {
                "candidates": exposure_candidates, "max_bits": float(np.log2(exposure_candidates + 1)),
                "mean_included": float(exp[canaries.included].mean()) if canaries.included.any() else None,
                "mean_excluded": float(exp[~canaries.included].mean()) if (~canaries.included).any() else None,
            }
    return Leakage(run_dir=str(run_dir), accountant=accountant, membership=membership, canary_audit=audit,
                   notes=notes)


def _f(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def table(leak: Leakage) -> str:
    """The markdown table: each attack beside the accountant's epsilon and its unit."""
    acc = leak.accountant
    eps = "infinity (no DP)" if acc["epsilon"] is None else f"{acc['epsilon']:.3f}"
    lines = ["| attack | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | empirical eps (lower bound) | accountant eps | unit |",
             "|---|---|---|---|---|---|---|"]
    for name, key in (("loss threshold (Yeom et al. 2018)", "loss_threshold"),
                      ("reference-calibrated (pre-trained reference)", "reference_calibrated")):
        m = leak.membership[key]
        lines.append(f"| MIA: {name}, {m['members']} members / {m['non_members']} non-members | {m['auc']:.3f} | "
                     f"{m['tpr_at_0.01_fpr']:.3f} | {m['tpr_at_0.001_fpr']:.3f} | | {eps} | {acc['privacy_unit']} |")
    a = leak.canary_audit
    if a is not None:
        lines.append(f"| one-run canary audit (Steinke et al. 2023), {a['canaries']} canaries, {a['correct']}/"
                     f"{a['guesses']} guesses right | | | | {a['epsilon_lower_bound']:.3f} at {a['confidence']:.0%} "
                     f"(delta={a['delta']:g}; at most {a['max_certifiable']:.2f} certifiable) | {eps} | "
                     f"{acc['privacy_unit']} (the canary: one example) |")
        if "exposure" in a:
            x = a["exposure"]
            lines.append(f"| secret-sharer exposure (Carlini et al. 2019), bits of at most {x['max_bits']:.2f} | | | | "
                         f"included {_f(x['mean_included'], '.2f')} vs excluded {_f(x['mean_excluded'], '.2f')} | | |")
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in leak.notes)
