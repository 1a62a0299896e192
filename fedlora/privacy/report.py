"""Privacy report: epsilon vs rounds under RDP and PRV, and what sampling buys.

    python -m fedlora.privacy.report --sample-rate 0.142 --noise-multiplier 1.41 \
        --steps-per-round 53 --rounds 3 --delta 1e-5
    python -m fedlora.privacy.report --unit client --sample-rate 0.1 \
        --noise-multiplier 1.1 --steps-per-round 1 --rounds 100
    python -m fedlora.privacy.report --run-dir outputs/2026-11-28/04-03-55

Sample-level: q = batch size / shard size, steps = local DP-SGD steps per round.
Client-level (DP-FedAvg): q = client sampling rate, one step per round. The last form
recomputes every client's epsilon from the run's ledger.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedlora.core.units import CLIENT, SAMPLE
from fedlora.privacy.accounting import epsilon_from_history
from fedlora.privacy.ledger import ACCOUNTANTS, PrivacyLedger


def rounds_table(q: float, sigma: float, steps: int, rounds: int, delta: float) -> str:
    lines = ["| round | steps | eps RDP | eps PRV |", "|---|---|---|---|"]
    for r in range(1, rounds + 1):
        hist = [(sigma, q, steps * r)]
        eps = [epsilon_from_history(hist, delta, a) for a in ACCOUNTANTS]
        lines.append(f"| {r} | {steps * r} | {eps[0]:.4f} | {eps[1]:.4f} |")
    return "\n".join(lines)


def amplification_table(q: float, sigma: float, steps: int, rounds: int, delta: float) -> str:
    """Same noise and steps at other sample rates: Poisson subsampling amplifies privacy."""
    lines = ["| sample rate | eps RDP after all rounds |", "|---|---|"]
    rates = sorted({min(1.0, q * f) for f in (0.25, 0.5, 1.0, 2.0, 4.0)} | {1.0})
    for rate in rates:
        eps = epsilon_from_history([(sigma, rate, steps * rounds)], delta, "rdp")
        mark = " (this run)" if abs(rate - q) < 1e-12 else (" (no sampling)" if rate == 1.0 else "")
        lines.append(f"| {rate:.4f}{mark} | {eps:.4f} |")
    return "\n".join(lines)


def run_dir_report(run_dir: Path) -> str:
    payload = json.loads((run_dir / "results.json").read_text())
    ledger = PrivacyLedger.from_dict(payload.get("privacy_ledger", {}))
    if not ledger.entries:
        return f"{run_dir}: no DP ledger entries (privacy unit {payload['config']['privacy']['unit']})"
    # A round may hold several releases (DP-SGD, then a noisy evaluation under
    # privacy.evaluation=dp): the ledger has one entry per release.
    lines = ["| client | unit | rounds | releases | steps | eps RDP | eps PRV | delta |",
             "|---|---|---|---|---|---|---|---|"]
    for c in ledger.clients():
        hist = ledger.history(c)
        mine = [e for e in ledger.entries if e.client == c]
        unit, rounds = mine[0].unit, len({e.round for e in mine})
        lines.append(
            f"| {c} | {unit}-level | {rounds} | {len(hist)} | {sum(h[2] for h in hist)} | {ledger.epsilon(c, 'rdp'):.4f} | "
            f"{ledger.epsilon(c, 'prv'):.4f} | {ledger.delta(c):g} |"
        )
    return "epsilon recomputed from the ledger (client 'all': client-level, holds for every client)\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--sample-rate", type=float)
    p.add_argument("--noise-multiplier", type=float)
    p.add_argument("--steps-per-round", type=int)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--unit", choices=[SAMPLE, CLIENT], default=SAMPLE,
                   help="privacy unit the numbers are in (labels the output)")
    args = p.parse_args(argv)
    if args.run_dir:
        if not (args.run_dir / "results.json").is_file():
            print(f"error: no results.json in {args.run_dir}", file=sys.stderr)
            return 2
        print(run_dir_report(args.run_dir))
        return 0
    if None in (args.sample_rate, args.noise_multiplier, args.steps_per_round):
        p.error("give --run-dir, or all of --sample-rate, --noise-multiplier and --steps-per-round")
    if not (0 < args.sample_rate <= 1 and args.noise_multiplier > 0 and args.steps_per_round > 0):
        p.error("need 0 < sample rate <= 1, noise multiplier > 0, steps per round > 0")
    q, s, k, r, d = args.sample_rate, args.noise_multiplier, args.steps_per_round, args.rounds, args.delta
    print(f"{args.unit}-level epsilon vs rounds (q={q}, sigma={s}, {k} steps/round, delta={d})")
    print(rounds_table(q, s, k, r, d))
    print()
    print("amplification by sampling")
    print(amplification_table(q, s, k, r, d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
