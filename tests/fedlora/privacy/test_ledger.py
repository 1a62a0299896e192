"""The ledger is enough to recompute epsilon, with an independent library as referee."""

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from fedlora.privacy.ledger import LedgerEntry, PrivacyLedger
from fedlora.privacy.report import main as report_main


def _pld_epsilon(history, delta):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def _ledger():
    led = PrivacyLedger()
    for rnd in (1, 2, 3):
        led.add(LedgerEntry("0", rnd, "sample", 1.409, 0.142, 53, 1e-5))
        if rnd != 2:  # client 1 sits out round 2
            led.add(LedgerEntry("1", rnd, "sample", 0.9, 0.07, 20, 1e-5))
    return led


@pytest.mark.parametrize("client", ["0", "1"])
def test_prv_agrees_with_pld_and_rdp_is_an_upper_bound(client):
    led = _ledger()
    pld = _pld_epsilon(led.history(client), 1e-5)
    assert led.epsilon(client, "prv") == pytest.approx(pld, rel=0.02)
    assert led.epsilon(client, "rdp") >= pld


def test_epsilon_by_round_is_cumulative_and_skips_absent_rounds():
    by_round = _ledger().epsilon_by_round("rdp")
    assert list(by_round["0"]) == [1, 2, 3] and list(by_round["1"]) == [1, 3]
    e = by_round["0"]
    assert e[1] < e[2] < e[3]


def test_round_trip_through_json():
    led = _ledger()
    again = PrivacyLedger.from_dict(led.to_dict())
    assert again.entries == led.entries
    assert again.epsilons("prv") == led.epsilons("prv")


def test_report_cli_tables(capsys):
    assert report_main(["--sample-rate", "0.1", "--noise-multiplier", "1.0", "--steps-per-round", "10",
                        "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2
    assert "(no sampling)" in out and "(this run)" in out


def test_report_cli_rejects_bad_input(tmp_path, capsys):
    assert report_main(["--run-dir", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        report_main(["--sample-rate", "2", "--noise-multiplier", "1", "--steps-per-round", "1"])
