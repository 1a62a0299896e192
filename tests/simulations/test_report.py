"""The sweep report on fake run dirs: rows, varying keys, the grid, the plot, errors."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from simulations.report import PLOT, REPORT, main, varying_keys

ROOT = Path(__file__).resolve().parents[2]


def _config(unit="sample", eps=8.0, seed=0, r=8, rounds=2):
    privacy = {"unit": unit} if unit == "none" else {"unit": unit, "target_epsilon": eps, "delta": 1e-5,
                                                     "accountant": "rdp"}
    return {"seed": seed, "resume": False, "lora": {"r": r}, "privacy": privacy, "federation": {"rounds": rounds}}


def _run(run_dir, config, accuracy, epsilon=None, overrides=None, finished=True, perplexity=None, evaluation=None):
    run_dir.mkdir(parents=True)
    unit = config["privacy"]["unit"]
    final = {"accuracy": accuracy, "epsilon": epsilon, "delta": None if unit == "none" else 1e-5,
             "privacy_unit": unit, "rounds_completed": 2, "wall_s": 123.4,
             "epsilon_by_accountant": {} if epsilon is None else {"rdp": epsilon, "prv": epsilon * 0.9}}
    if evaluation is not None:
        final["evaluation"] = {"mode": evaluation, "covered": unit == "none" or evaluation != "plain"}
    rounds = [{"round": 0, "accuracy": 0.5},
              {"round": 1, "accuracy": accuracy, "clients": [], "epsilon": epsilon, "bytes_up": 1_500_000,
               "bytes_down": 3_000_000}]
    if perplexity is not None:
        rounds[1]["perplexity"] = perplexity
    payload = {"config": config, "rounds": rounds, "final": final if finished else None}
    (run_dir / "results.json").write_text(json.dumps(payload))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def _rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]


def test_causal_lm_runs_get_a_perplexity_column(tmp_path):
    sweep = tmp_path / "lm"
    _run(sweep / "0", _config(eps=8), 0.7, epsilon=7.99, overrides=["privacy.target_epsilon=8"], perplexity=1.83)
    _run(sweep / "1", _config(eps=3), 0.6, epsilon=2.99, overrides=["privacy.target_epsilon=3"], perplexity=2.5)
    assert main([str(sweep)]) == 0
    text = (sweep / REPORT).read_text()
    assert "| test perplexity |" in text and "| MB up | MB down |" in text
    assert "| 0.700 | 1.830 |" in text and "| 1.50 | 3.00 |" in text


def test_multirun_rows_common_overrides_gap_and_plot(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    for i, eps in enumerate([1, 3, 8]):
        _run(sweep / str(i), _config(eps=eps), 0.69 + 0.02 * i, epsilon=eps - 0.001,
             overrides=[f"privacy.target_epsilon={eps}", "federation.rounds=2", "hydra.run.dir=x"],
             evaluation="dp" if i < 2 else "plain")
    _run(sweep / "no_dp", _config(unit="none"), 0.755, overrides=["privacy=none", "federation.rounds=2"],
         evaluation="plain")
    assert main([str(sweep)]) == 0
    text = (sweep / REPORT).read_text()
    assert text in capsys.readouterr().out
    rows = _rows(text.split("Overrides every run shares")[0])
    assert rows[0] == ("| 0 | `privacy.target_epsilon=1` | 0.690 | -6.5 | 0.999 (RDP; PRV 0.899) | 1e-05 "
                       "| sample-level (max over clients) | dp | 2/2 | 1.50 | 3.00 | 123 |")
    assert [r.split(" | ")[0] for r in rows] == ["| 0", "| 1", "| 2", "| no_dp"]
    # Clients' metrics in the clear under DP are flagged; without DP there is nothing to cover.
    assert "| plain (not covered) |" in rows[2]
    assert rows[3].startswith("| no_dp | `privacy=none` | 0.755 | +0.0 | – (no DP) | – | no DP | plain |")
    assert "Overrides every run shares: `federation.rounds=2`." in text
    png = (sweep / PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_runs_without_overrides_show_only_the_keys_that_vary(tmp_path):
    assert varying_keys([_config(seed=0), _config(seed=1, r=16), _config(seed=0)]) == ["lora.r", "seed"]
    assert varying_keys([_config(), {**_config(), "resume": True}]) == []  # how it was launched
    _run(tmp_path / "a", _config(seed=0), 0.70, epsilon=7.9)
    _run(tmp_path / "b", _config(seed=1, r=16), 0.72, epsilon=7.9, finished=False)
    assert main([str(tmp_path), "--out", str(tmp_path / "out" / "sweep.md")]) == 0
    rows = _rows((tmp_path / "out" / "sweep.md").read_text())
    assert rows[0].startswith("| a | `lora.r=8 seed=0` | 0.700 |")
    assert rows[1].startswith("| b | `lora.r=16 seed=1` | 0.720 |") and "1/2 (unfinished)" in rows[1]
    assert not (tmp_path / "out" / PLOT).exists()  # epsilon does not vary


def test_robustness_layout_pivots_into_the_attack_by_aggregator_table(tmp_path):
    for agg in ("fedavg", "krum"):
        for attack in ("none", "sign_flip"):
            _run(tmp_path / f"{agg}__{attack}", _config(unit="none"), 0.7 if attack == "none" else 0.6,
                 overrides=["experiment=robustness", f"strategy={agg}", f"attack={attack}"])
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / REPORT).read_text()
    grid = text.split("Final test accuracy by `strategy` and `attack`:")[1]
    assert "| strategy \\ attack | none | sign_flip |" in grid
    assert "| fedavg | 0.700 | 0.600 |" in grid and "| krum | 0.700 | 0.600 |" in grid
    assert "Overrides every run shares: `experiment=robustness`." in text


def test_robustness_table_uses_the_report_pivot():
    from simulations.robustness import table

    cells = [{"aggregator": "median", "attack": "none", "accuracy": 0.7},
             {"aggregator": "median", "attack": "ipm", "accuracy": None}]
    assert table(cells, ["median"], ["none", "ipm"]).splitlines() == [
        "| aggregator | none | ipm |", "|---|---|---|", "| median | 0.700 | – |"]


def test_clear_errors_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no results.json below" in capsys.readouterr().err
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "results.json").write_text('{"config": {"seed"')
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unreadable or torn" in err and "torn/results.json" in err
    assert main([str(tmp_path / "missing")]) == 2


def test_command_line(tmp_path):
    _run(tmp_path / "run", _config(), 0.75, epsilon=7.99, overrides=[])
    proc = subprocess.run([sys.executable, "-m", "simulations.report", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| . | `(defaults)` | 0.750 | 7.990 (RDP; PRV 7.191) |" in proc.stdout
    assert (tmp_path / "run" / REPORT).is_file()
    proc = subprocess.run([sys.executable, "-m", "simulations.report", str(tmp_path / "nothing")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
