"""Sweep report: one markdown table row per run found below a directory.

    python -m simulations.report outputs/2026-11-28/10-00-00        # one run dir
    python -m simulations.report multirun/2026-11-28/10-00-00       # a Hydra sweep (-m)
    python -m simulations.report outputs/robustness                 # python -m simulations.robustness
    python -m simulations.report multirun/... --out sweep.md

Finds every ``results.json`` below the path. Each row shows the run's key overrides
(its ``.hydra/overrides.yaml``, less those every run shares; a run without one shows the
config keys whose values differ between the runs), final test accuracy, epsilon with its
accountant, delta and privacy unit, rounds completed and wall time. When the runs form
a grid over two overrides (e.g. ``strategy`` x ``attack``) a second table pivots final
accuracy over them. Writes ``report.md`` into the path (or ``--out``) and, when epsilon
varies between runs, ``accuracy_vs_epsilon.png`` beside it (runs without DP drawn as
labelled horizontal lines). Exit code 2, with a message naming the fix, when nothing
is found or a file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedlora.core.units import CLIENT, LABEL, NONE, SAMPLE, SCOPE
from fedlora.record.checkpoint import resume_commands

RESULTS = "results.json"
REPORT = "report.md"
PLOT = "accuracy_vs_epsilon.png"
UNIT_TEXT = {unit: f"{LABEL[unit]} ({SCOPE[unit]})" for unit in (SAMPLE, CLIENT)} | {NONE: LABEL[NONE]}
# How a run was launched, not what it computed.
_IGNORED_KEYS = ("resume",)


class ReportError(Exception):
    """Nothing to report, or a file that cannot be read; the message says what to do."""


@dataclass
class Run:
    run_dir: Path
    name: str
    config: dict[str, Any]
    final: dict[str, Any]
    rounds: list[dict[str, Any]]
    overrides: list[str] | None
    # What tells this run apart from the others: overrides, or key=value of varying keys.
    distinct: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(self.distinct) or "(defaults)"

    @property
    def unit(self) -> str:
        return str(self.final.get("privacy_unit") or (self.config.get("privacy") or {}).get("unit", "none"))

    @property
    def accuracy(self) -> float | None:
        if self.final.get("accuracy") is not None:
            return self.final["accuracy"]
        evaluated = [r for r in self.rounds if r.get("accuracy") is not None]
        return evaluated[-1]["accuracy"] if evaluated else None

    @property
    def perplexity(self) -> float | None:
        """The last evaluated test perplexity (causal-LM runs)."""
        evaluated = [r for r in self.rounds if r.get("perplexity") is not None]
        return evaluated[-1]["perplexity"] if evaluated else None

    def traffic_mb(self, key: str) -> float | None:
        """Adapter payload of the published rounds in MB (``bytes_up`` / ``bytes_down``);
        None where the run does not publish it (client-level DP: it counts the clients)."""
        values = [r[key] for r in self.rounds if r.get(key) is not None]
        return sum(values) / 1e6 if values else None

    @property
    def epsilon(self) -> float | None:
        if self.unit == NONE:
            return None
        if self.final:
            return self.final.get("epsilon")
        spent = [r["epsilon"] for r in self.rounds if r.get("epsilon") is not None]
        return spent[-1] if spent else None

    @property
    def evaluation(self) -> str:
        """``privacy.evaluation`` of the run: what clients released about their validation
        data (plain under DP: not covered by its epsilon)."""
        mode = (self.final.get("evaluation") or {}).get("mode") or (self.config.get("privacy") or {}).get("evaluation")
        if mode is None:
            return "–"
        return f"{mode} (not covered)" if mode == "plain" and self.unit != NONE else str(mode)

    @property
    def delta(self) -> float | None:
        if self.unit == NONE:
            return None
        return self.final.get("delta", (self.config.get("privacy") or {}).get("delta"))


def _natural(path: Path) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def find_results(root: Path) -> list[Path]:
    """Every ``results.json`` at or below ``root``, numbered sweep dirs in numeric order."""
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root} does not exist; give a run dir, a multirun dir or a robustness --out dir")
    if root.is_file():
        if root.name != RESULTS:
            raise ReportError(f"{root} is not a {RESULTS}; give the run dir or the sweep dir that holds it")
        return [root]
    found = sorted(root.rglob(RESULTS), key=lambda p: _natural(p.relative_to(root)))
    if not found:
        raise ReportError(
            f"no {RESULTS} below {root}; point the report at the run dir (hydra.run.dir) of a finished "
            "or running simulations.run, or at a sweep dir (hydra.sweep.dir, or simulations.robustness --out)"
        )
    return found


def load_run(results: Path, root: Path) -> Run:
    try:
        payload = json.loads(results.read_text())
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ReportError(
            f"{results} is unreadable or torn ({err}); continue that run ({resume_commands(results.parent)}) or move its "
            "directory out of the sweep"
        ) from None
    run_dir = results.parent
    overrides = None
    hydra_overrides = run_dir / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        try:
            overrides = [str(o) for o in (yaml.safe_load(hydra_overrides.read_text()) or [])]
        except (OSError, yaml.YAMLError) as err:
            raise ReportError(f"{hydra_overrides} is unreadable ({err}); fix or delete it") from None
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    name = "." if run_dir == root else str(run_dir.relative_to(root))
    return Run(run_dir, name, payload.get("config") or {}, payload.get("final") or {}, payload.get("rounds") or [],
               overrides)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept whole)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


_MISSING = object()


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Dotted config keys whose value is not the same in every config (absent counts)."""
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if k.split(".")[0] not in _IGNORED_KEYS
            and len({json.dumps(f.get(k, _MISSING), sort_keys=True, default=str) for f in flat}) > 1]


def _value_text(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def label_runs(runs: list[Run]) -> list[str]:
    """Set each run's ``distinct`` overrides; return the overrides every run shares.

    A run with ``.hydra/overrides.yaml`` is told apart by its overrides less those all
    such runs share; a run without one by ``key=value`` of the config keys that vary.
    """
    with_overrides = [r for r in runs if r.overrides is not None]
    common: list[str] = []
    if len(with_overrides) > 1:
        common = [o for o in with_overrides[0].overrides if all(o in r.overrides for r in with_overrides[1:])]
    varying = varying_keys([r.config for r in runs]) if len(runs) > 1 else []
    for run in runs:
        if run.overrides is not None:
            run.distinct = [o for o in run.overrides if o not in common]
        else:
            flat = flatten(run.config)
            run.distinct = [f"{k}={_value_text(flat.get(k))}" for k in varying if k in flat]
    return common


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pivot_table(values: dict[tuple[str, str], float | None], rows: list[str], cols: list[str], corner: str,
                fmt: str = "{:.3f}") -> str:
    """A markdown table of ``values[(row, col)]``; missing or failed cells show as ``–``."""
    body = [[row] + ["–" if values.get((row, col)) is None else fmt.format(values[(row, col)]) for col in cols]
            for row in rows]
    return markdown_table([corner] + cols, body)


def epsilon_text(run: Run) -> str:
    if run.unit == NONE:
        return "– (no DP)"
    eps = run.epsilon
    if eps is None:
        return "n/a"
    accountant = str((run.config.get("privacy") or {}).get("accountant", "rdp"))
    others = {k: v for k, v in (run.final.get("epsilon_by_accountant") or {}).items()
              if k != accountant and v is not None}
    extra = "".join(f"; {k.upper()} {v:.3f}" for k, v in sorted(others.items()))
    return f"{eps:.3f} ({accountant.upper()}{extra})"


def _rounds_text(run: Run) -> str:
    done = run.final.get("rounds_completed")
    if done is None:
        done = max((r["round"] for r in run.rounds if "clients" in r), default=0)
    planned = (run.config.get("federation") or {}).get("rounds")
    text = f"{done}/{planned}" if planned is not None else str(done)
    return text if run.final else f"{text} (unfinished)"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def runs_table(runs: list[Run]) -> str:
    baseline = [r for r in runs if r.unit == NONE and r.accuracy is not None]
    # A gap to "no DP" is only meaningful against one baseline.
    gap = len(baseline) == 1 and any(r.unit != NONE for r in runs)
    lm = any(r.perplexity is not None for r in runs)
    header = ["run", "overrides", "test accuracy"] + (["gap to no DP (points)"] if gap else []) + (
        ["test perplexity"] if lm else []) + [
        "epsilon", "delta", "privacy unit", "client evaluation", "rounds", "MB up", "MB down", "wall time (s)"]
    rows = []
    for run in runs:
        row = [run.name, f"`{run.label}`", _fmt(run.accuracy, ".3f")]
        if gap:
            row.append("–" if run.accuracy is None else f"{100 * (run.accuracy - baseline[0].accuracy):+.1f}")
        if lm:
            row.append(_fmt(run.perplexity, ".3f"))
        row += [epsilon_text(run), _fmt(run.delta, "g"), UNIT_TEXT.get(run.unit, run.unit), run.evaluation,
                _rounds_text(run),
                _fmt(run.traffic_mb("bytes_up"), ".2f"), _fmt(run.traffic_mb("bytes_down"), ".2f"),
                _fmt(run.final.get("wall_s"), ".0f")]
        rows.append(row)
    return markdown_table(header, rows)


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def grid_axes(runs: list[Run]) -> tuple[str, str] | None:
    """The two override keys the runs form a grid over (first-named key = rows), if any."""
    if len(runs) < 2 or any(r.overrides is None for r in runs):
        return None
    labels = [[_split(o) for o in r.distinct] for r in runs]
    keys = [k for k, _ in labels[0]]
    if len(keys) != 2 or any([k for k, _ in lab] != keys for lab in labels):
        return None
    if len({tuple(v for _, v in lab) for lab in labels}) != len(runs):
        return None  # repeated cells (e.g. seeds) do not pivot into one value each
    return keys[0], keys[1]


def grid_table(runs: list[Run], axes: tuple[str, str]) -> str:
    row_key, col_key = axes
    cells = {}
    rows: list[str] = []
    cols: list[str] = []
    for run in runs:
        values = dict(_split(o) for o in run.distinct)
        r, c = values[row_key], values[col_key]
        rows += [r] if r not in rows else []
        cols += [c] if c not in cols else []
        cells[(r, c)] = run.accuracy
    return pivot_table(cells, rows, cols, f"{row_key} \\ {col_key}")


def epsilon_varies(runs: list[Run]) -> bool:
    values = {None if r.epsilon is None else round(r.epsilon, 6) for r in runs if r.accuracy is not None}
    return len(values) > 1 and any(v is not None for v in values)


def plot_accuracy_vs_epsilon(runs: list[Run], path: Path) -> Path:
    """Final accuracy against epsilon; runs without DP as labelled horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in runs if r.epsilon is not None and r.accuracy is not None]
    no_dp = [r for r in runs if r.unit == NONE and r.accuracy is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if dp:
        ax.plot([r.epsilon for r in dp], [r.accuracy for r in dp], "o", color="tab:blue", label="with DP")
        for r in dp:
            ax.annotate(r.label, (r.epsilon, r.accuracy), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")
        ax.margins(x=0.15)  # room for the labels of the outermost points
        eps = [r.epsilon for r in dp]
        if min(eps) > 0 and max(eps) / min(eps) > 20:
            ax.set_xscale("log")
    for i, r in enumerate(no_dp):
        ax.axhline(r.accuracy, linestyle="--", color=f"C{i + 1}", linewidth=1,
                   label=f"no DP: {r.label} ({r.accuracy:.3f})")
    units = {(r.unit, r.delta) for r in dp}
    if len(units) == 1:
        unit, delta = units.pop()
        ax.set_xlabel(f"epsilon ({UNIT_TEXT.get(unit, unit)}, delta={delta:g})")
    else:
        ax.set_xlabel("epsilon (units and deltas differ: see the table)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Privacy-utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_report(root: Path, out: Path | None = None) -> tuple[str, Path, Path | None]:
    """The report's markdown, where it was written, and the plot (if epsilon varies)."""
    root = Path(root)
    runs = [load_run(p, root if root.is_dir() else root.parent) for p in find_results(root)]
    common = label_runs(runs)
    out = Path(out) if out is not None else (root if root.is_dir() else root.parent) / REPORT
    parts = [f"# Runs below `{root}`", "", runs_table(runs), ""]
    if common:
        parts += [f"Overrides every run shares: `{' '.join(common)}`.", ""]
    parts += ["Epsilon: the federation's guarantee at the end of the run in its privacy unit (sample-level: the "
              "largest over clients; client-level: every client), from the run's privacy ledger under the "
              "config's accountant, other accountants in brackets.", ""]
    axes = grid_axes(runs)
    if axes:
        parts += [f"Final test accuracy by `{axes[0]}` and `{axes[1]}`:", "", grid_table(runs, axes), ""]
    plot = None
    if epsilon_varies(runs):
        plot = plot_accuracy_vs_epsilon(runs, out.parent / PLOT)
        parts += [f"![accuracy vs epsilon]({plot.name})", ""]
    text = "\n".join(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text, out, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run dir, a Hydra multirun dir or a robustness --out dir")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown file to write (default: <path>/{REPORT})")
    args = parser.parse_args(argv)
    try:
        text, out, plot = build_report(args.path, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    print(f"written: {out}" + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
