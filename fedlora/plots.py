"""PNG plots of a run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedlora.privacy.ledger import EVERY_CLIENT, PrivacyLedger  # noqa: E402


def plot_epsilon(
    ledger: PrivacyLedger, path: Path, accountant: str, target: float | None = None, unit: str = "sample"
) -> Path:
    """Cumulative epsilon of every client vs round, with the target as a dashed line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for client, by_round in ledger.epsilon_by_round(accountant).items():
        rounds = sorted(by_round)
        ax.plot(rounds, [by_round[r] for r in rounds], marker="o", label="every client" if client == EVERY_CLIENT else f"client {client}")
    if target is not None:
        ax.axhline(target, linestyle="--", color="black", linewidth=1, label=f"target {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon ({accountant.upper()}, cumulative)")
    ax.set_title(f"Privacy spent per client ({unit}-level)")
    if len(ledger.clients()) <= 12:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
