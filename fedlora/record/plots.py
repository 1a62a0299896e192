"""PNG plots of a run (matplotlib Agg, no display needed).

- ``metrics.png``: test accuracy and loss vs round (and federated evaluation if any);
- ``epsilon.png``: each client's cumulative epsilon vs round, each against its own
  budget (sample-level DP) or one curve for every client (client-level DP);
- ``participation.png``: which client trained in which round (client x round grid:
  accepted, not selected by the aggregator, rejected, declined, no reply, not sampled;
  malicious clients marked).

Large federations stay readable and cheap: beyond :data:`MAX_ROWS` clients the epsilon
plot shows the spread over the clients that took part (min, median, max per round) and
the participation plot the number of clients per round in each state; no plot ever
holds a row per client of the federation, only per client that took part.

:class:`RunPlots` is a :class:`fedlora.record.results.RunRecorder` listener that rewrites them
after every round, so a crashed run still has its plots, and at the end. Every file is
written to a temporary name and renamed, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from fedlora.core.files import write_atomic  # noqa: E402
from fedlora.core.units import SAMPLE  # noqa: E402
from fedlora.privacy.budgets import client_epsilons  # noqa: E402
from fedlora.privacy.ledger import EVERY_CLIENT, PrivacyLedger  # noqa: E402

log = logging.getLogger(__name__)

METRICS_PNG = "metrics.png"
EPSILON_PNG = "epsilon.png"
PARTICIPATION_PNG = "participation.png"
# Above this many clients a legend hides the plot; the budget lines still show.
_MAX_LEGEND = 12
# Above this many clients a row (or curve) per client is unreadable: aggregate.
MAX_ROWS = 200


def _budgets(privacy: dict[str, Any], clients: list[str], num_clients: int) -> dict[str, float]:
    """The budgets of the clients that spent (sample-level DP), not of every client."""
    if privacy.get("unit") != SAMPLE or privacy.get("target_epsilon") is None:
        return {}
    ids = [int(c) for c in clients if str(c).isdigit()]
    return {str(c): eps for c, eps in client_epsilons(OmegaConf.create(privacy), ids, num_clients).items()}


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    return write_atomic(Path(path), buffer.getvalue())


def plot_metrics(rounds: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy and loss vs round (round 0 = before training), side by side."""
    evaluated = [r for r in rounds if r.get("accuracy") is not None or r.get("loss") is not None]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    xs = [r["round"] for r in evaluated]
    acc_ax.plot(xs, [r.get("accuracy") for r in evaluated], marker="o", label="test (server)")
    loss_ax.plot(xs, [r.get("loss") for r in evaluated], marker="o", label="test (server)")
    fed = [r for r in rounds if r.get("federated_evaluation")]
    if fed:
        fx = [r["round"] for r in fed]
        acc_ax.plot(fx, [r["federated_evaluation"].get("accuracy") for r in fed], marker="s", linestyle=":",
                    label="clients' validation")
        loss_ax.plot(fx, [r["federated_evaluation"].get("loss") for r in fed], marker="s", linestyle=":",
                     label="clients' validation")
    for ax, name in ((acc_ax, "accuracy"), (loss_ax, "loss")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    acc_ax.set_title("Accuracy")
    loss_ax.set_title("Loss")
    fig.tight_layout()
    return _save(fig, path)


def plot_epsilon(
    ledger: PrivacyLedger,
    path: Path,
    accountant: str,
    target: float | None = None,
    unit: str = SAMPLE,
    budgets: dict[str, float] | None = None,
    delta: float | None = None,
) -> Path:
    """Cumulative epsilon of every client vs round, against the budgets.

    With ``budgets`` (client id -> epsilon, sample-level DP) each client's budget is a
    dashed line in that client's colour, since clients may hold different budgets
    (Boenisch et al. 2023); otherwise ``target`` is one black dashed line.
    """
    budgets = budgets or {}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    by_client = ledger.epsilon_by_round(accountant)
    if len(by_client) > MAX_ROWS:
        return _plot_epsilon_spread(fig, ax, by_client, path, accountant, target, unit, budgets, delta)
    for client, by_round in by_client.items():
        rounds = sorted(by_round)
        label = "every client" if client == EVERY_CLIENT else f"client {client}"
        if client in budgets:
            label += f" (budget {budgets[client]:g})"
        (line,) = ax.plot(rounds, [by_round[r] for r in rounds], marker="o", label=label)
        if client in budgets:
            ax.axhline(budgets[client], linestyle="--", color=line.get_color(), linewidth=1)
    handles, _ = ax.get_legend_handles_labels()
    if budgets and any(c in budgets for c in by_client):
        handles.append(Line2D([], [], linestyle="--", color="black", linewidth=1, label="budget (client's colour)"))
    elif target is not None:
        ax.axhline(target, linestyle="--", color="black", linewidth=1)
        handles.append(Line2D([], [], linestyle="--", color="black", linewidth=1, label=f"target {target:g}"))
    if len(by_client) <= _MAX_LEGEND:
        ax.legend(handles=handles, fontsize="small")
    return _finish_epsilon(fig, ax, path, accountant, unit, delta)


def _finish_epsilon(fig: Any, ax: Any, path: Path, accountant: str, unit: str, delta: float | None) -> Path:
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon ({accountant.upper()}, cumulative)")
    delta_text = f", delta={delta:g}" if delta is not None else ""
    ax.set_title(f"Privacy spent per client ({unit}-level{delta_text})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _plot_epsilon_spread(fig: Any, ax: Any, by_client: dict[str, dict[int, float]], path: Path, accountant: str,
                         target: float | None, unit: str, budgets: dict[str, float], delta: float | None) -> Path:
    """Many clients: after each round, the min, median and max epsilon over the clients
    that had spent by then, and the smallest budget among them."""
    rounds = sorted({r for by_round in by_client.values() for r in by_round})
    spent: dict[int, list[float]] = {r: [] for r in rounds}
    for by_round in by_client.values():
        own = sorted(by_round)
        for r in rounds:
            past = [x for x in own if x <= r]
            if past:
                spent[r].append(by_round[past[-1]])
    lows, mids, highs = ([float(f(spent[r])) for r in rounds] for f in (np.min, np.median, np.max))
    ax.fill_between(rounds, lows, highs, alpha=0.3, label=f"min-max over {len(by_client)} clients")
    ax.plot(rounds, mids, marker="o", label="median client")
    shown = [budgets[c] for c in by_client if c in budgets]
    if shown or target is not None:
        line = min(shown) if shown else target
        ax.axhline(line, linestyle="--", color="black", linewidth=1,
                   label=f"smallest budget {line:g}" if shown else f"target {line:g}")
    ax.legend(fontsize="small")
    return _finish_epsilon(fig, ax, path, accountant, unit, delta)


# Participation states, in the order of their colours.
STATES = (
    "not sampled", "accepted", "accepted, not selected by the aggregator", "rejected", "declined (budget)", "no reply",
)
_COLOURS = ("#eeeeee", "#2ca02c", "#bcbd22", "#d62728", "#ff7f0e", "#444444")


def participation_grid(rounds: list[dict[str, Any]], client_ids: list[str]) -> tuple[list[int], list[list[int]]]:
    """The trained rounds and, per client, the index in :data:`STATES` of each round.

    A client the server sampled that did not reply is "no reply" when the sampler's
    record names it; without a sampling record every client that replied counts as
    sampled.
    """
    trained = [r for r in rounds if r.get("round", 0) > 0 and ("clients" in r or "sampled" in r)]
    # One column per round up to the last trained one: a round with no record (lost in a
    # crash before it was written) shows as a blank column, not as a shifted grid.
    xs = list(range(1, max((r["round"] for r in trained), default=0) + 1))
    row = {cid: i for i, cid in enumerate(client_ids)}
    grid = [[0] * len(xs) for _ in client_ids]
    for rec in trained:
        col = rec["round"] - 1
        for cid in (rec.get("sampled") or {}).get("clients", []):
            if str(cid) in row:
                grid[row[str(cid)]][col] = STATES.index("no reply")
        selected = (rec.get("aggregation") or {}).get("decisions", {}).get("selected")
        selected = None if selected is None else {str(c) for c in selected}
        for info in rec.get("clients", []):
            cid = str(info.get("cid"))
            if cid not in row:
                continue
            if info.get("declined"):
                state = "declined (budget)"
            elif not info.get("accepted"):
                state = "rejected"
            elif selected is not None and cid not in selected:
                state = "accepted, not selected by the aggregator"
            else:
                state = "accepted"
            grid[row[cid]][col] = STATES.index(state)
    return xs, grid


def participation_rows(rounds: list[dict[str, Any]], num_clients: int) -> list[str]:
    """The participation plot's rows: every client of a federation of at most
    :data:`MAX_ROWS`, only the clients ever sampled or heard from in a larger one (the
    plot's cost follows the clients that took part, not the federation's size)."""
    seen: dict[str, None] = {}
    for rec in rounds:  # clients outside 0..N-1 (e.g. node ids) still get a row
        for cid in [*(rec.get("sampled") or {}).get("clients", []), *(i.get("cid") for i in rec.get("clients", []))]:
            seen[str(cid)] = None
    if int(num_clients) <= MAX_ROWS:
        everyone = [str(c) for c in range(int(num_clients))]
        return everyone + [c for c in seen if c not in set(everyone)]
    return sorted(seen, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))


def plot_participation(
    rounds: list[dict[str, Any]], num_clients: int, path: Path, malicious: list[Any] | None = None,
    attack: str | None = None,
) -> Path:
    """Client x round grid coloured by what happened to each client's update (rows:
    :func:`participation_rows`); beyond :data:`MAX_ROWS` rows, the count of clients in
    each state per round."""
    ids = participation_rows(rounds, num_clients)
    xs, grid = participation_grid(rounds, ids)
    if len(ids) > MAX_ROWS:
        return _plot_participation_counts(xs, grid, int(num_clients), path)
    malicious = {str(m) for m in (malicious or [])}
    height = min(max(2.0 + 0.22 * len(ids), 3.0), 16.0)
    width = min(max(4.0 + 0.35 * len(xs), 6.4), 16.0)
    fig, ax = plt.subplots(figsize=(width, height))
    if xs:
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(_COLOURS),
                  norm=BoundaryNorm([i - 0.5 for i in range(len(STATES) + 1)], len(STATES)),
                  extent=(xs[0] - 0.5, xs[-1] + 0.5, len(ids) - 0.5, -0.5))
    else:
        ax.text(0.5, 0.5, "no training round yet", ha="center", va="center", transform=ax.transAxes)
    for i, cid in enumerate(ids):
        if cid in malicious:
            sampled = [x for x, state in zip(xs, grid[i]) if state != 0]
            ax.scatter(sampled, [i] * len(sampled), marker="x", color="black", s=30, linewidths=1.2)
    step = max(1, len(ids) // 40)
    ax.set_yticks(range(0, len(ids), step))
    ax.set_yticklabels([f"{ids[i]}{' (malicious)' if ids[i] in malicious else ''}" for i in range(0, len(ids), step)],
                       fontsize="small")
    for label in ax.get_yticklabels():
        if label.get_text().endswith("(malicious)"):
            label.set_color("#9467bd")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    used = sorted({s for row in grid for s in row})
    handles = [Patch(facecolor=_COLOURS[s], edgecolor="#999999", label=STATES[s]) for s in used]
    if malicious:
        handles.append(Line2D([], [], marker="x", color="black", linestyle="", label=f"malicious ({attack or 'attack'})"))
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Client participation")
    fig.tight_layout()
    return _save(fig, path)


def _plot_participation_counts(xs: list[int], grid: list[list[int]], num_clients: int, path: Path) -> Path:
    """Many clients: per round, how many clients ended in each state (stacked bars)."""
    fig, ax = plt.subplots(figsize=(min(max(4.0 + 0.35 * len(xs), 6.4), 16.0), 4.0))
    counts = np.zeros((len(STATES), len(xs)), dtype=int)
    for row in grid:
        for col, state in enumerate(row):
            counts[state, col] += 1
    bottom = np.zeros(len(xs), dtype=int)
    for state in range(1, len(STATES)):  # "not sampled" is everyone else
        if counts[state].any():
            ax.bar(xs, counts[state], bottom=bottom, color=_COLOURS[state], label=STATES[state])
            bottom += counts[state]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("clients")
    ax.set_title(f"Client participation ({num_clients} clients, {len(grid)} ever sampled)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


class RunPlots:
    """A :class:`fedlora.record.results.RunRecorder` listener that writes the run's PNG plots."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._warned = False

    def write(self, recorder: Any) -> None:
        config = recorder.config or {}
        privacy = config.get("privacy") or {}
        num_clients = int((config.get("federation") or {}).get("num_clients", 0))
        rounds = recorder.published_rounds()
        plot_metrics(rounds, self.run_dir / METRICS_PNG)
        if recorder.ledger.entries:
            target = privacy.get("target_epsilon")
            plot_epsilon(recorder.ledger, self.run_dir / EPSILON_PNG, recorder.accountant,
                         None if target is None else float(target), unit=recorder.privacy_unit,
                         budgets=_budgets(privacy, recorder.ledger.clients(), num_clients), delta=recorder.delta)
        if not recorder.release.participation_public:
            # Under client-level DP who took part is secret and the counts are not noised:
            # no participation plot at all.
            (self.run_dir / PARTICIPATION_PNG).unlink(missing_ok=True)
            return
        attack = recorder.attack or {}
        plot_participation(rounds, num_clients, self.run_dir / PARTICIPATION_PNG,
                           malicious=attack.get("clients"), attack=attack.get("name"))

    def _write_safely(self, recorder: Any) -> None:
        # A plot must never stop a federation: warn once and carry on.
        try:
            self.write(recorder)
        except Exception as err:  # noqa: BLE001
            if not self._warned:
                log.warning("could not write the run's plots: %s: %s", type(err).__name__, err)
                self._warned = True

    def on_round(self, record: dict[str, Any], recorder: Any) -> None:
        self._write_safely(recorder)

    def on_finish(self, final: dict[str, Any], recorder: Any) -> None:
        self._write_safely(recorder)
