"""The attack x aggregator sweep: finished cells are read, not rerun, and the table and
its files hold every cell."""

import json

from simulations.robustness import main


def _finished(run_dir, accuracy, malicious):
    run_dir.mkdir(parents=True)
    payload = {"final": {"accuracy": accuracy, "wall_s": 12.5}, "attack": {"clients": malicious}}
    (run_dir / "results.json").write_text(json.dumps(payload))


def test_an_interrupted_sweep_reads_its_finished_cells(tmp_path, capsys):
    cells = {("fedavg", "none"): 0.81, ("krum", "none"): 0.79, ("fedavg", "sign_flip"): 0.35,
             ("krum", "sign_flip"): 0.77}
    for (aggregator, attack), accuracy in cells.items():
        _finished(tmp_path / f"{aggregator}__{attack}", accuracy, [] if attack == "none" else [1, 4])
    # An unfinished cell (no final block) would be rerun: here every cell is finished.
    code = main(["--out", str(tmp_path), "--aggregators", "fedavg", "krum", "--attacks", "none", "sign_flip"])
    assert code == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert {(c["aggregator"], c["attack"]): c["accuracy"] for c in saved["cells"]} == cells
    assert all(c["malicious_clients"] == [1, 4] for c in saved["cells"] if c["attack"] == "sign_flip")
    markdown = (tmp_path / "robustness.md").read_text()
    for text in (printed, markdown):
        assert "fedavg" in text and "krum" in text and "sign_flip" in text
        assert "0.35" in text and "0.77" in text
