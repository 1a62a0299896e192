"""Saved files that were tampered with: a checkpoint, a client's spend record or the
audit log is refused (or reported) with a reason naming the file, never used in part."""

import hashlib
import io
import json

import numpy as np
import pytest

from fedlora.client.state import ClientStateError, Residual, SpendLog
from fedlora.privacy.ledger import LedgerEntry, PrivacyLedger
from fedlora.record.audit import (
    AUDIT_FILE,
    GENESIS,
    MAC_FIELD,
    AuditTrail,
    read_key,
    verify_audit,
)
from fedlora.record.checkpoint import (
    Checkpoint,
    CheckpointError,
    content_digest,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.record.results import RunRecorder


@pytest.fixture(autouse=True)
def _audit_keys(tmp_path, monkeypatch):
    """Audit keys and key state in the test's own folders, outside its run dir."""
    monkeypatch.setenv("FEDLORA_AUDIT_KEY", str(tmp_path / "keys") + "/")
    monkeypatch.setenv("FEDLORA_AUDIT_STATE", str(tmp_path / "state"))


# -- checkpoint -------------------------------------------------------------------------
def _checkpoint(path):
    ledger = PrivacyLedger([LedgerEntry("0", 1, "sample", 1.2, 0.1, 5, 1e-5)])
    ckpt = Checkpoint(round=3, global_arrays=[np.arange(6, dtype=np.float32).reshape(2, 3)],
                      state={"experiment_id": "e", "privacy_ledger": ledger.to_dict()},
                      arrays={"reference": np.ones(4, np.float32)})
    save_checkpoint(path, ckpt)
    return ckpt


def _members(path):
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _rewrite(path, members):
    """What someone editing the file with NumPy writes back: a valid npz."""
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    path.write_bytes(buffer.getvalue())


def test_an_intact_checkpoint_loads(tmp_path):
    path = tmp_path / "checkpoint.npz"
    ckpt = _checkpoint(path)
    back = load_checkpoint(path)
    assert back.round == 3 and back.state == ckpt.state
    np.testing.assert_array_equal(back.global_arrays[0], ckpt.global_arrays[0])


def test_an_edited_array_is_refused(tmp_path):
    path = tmp_path / "checkpoint.npz"
    _checkpoint(path)
    members = _members(path)
    members["global_0"] = members["global_0"] + 1.0  # a different global adapter
    _rewrite(path, members)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "digest" in err.value.reason


def test_an_edited_json_state_is_refused(tmp_path):
    path = tmp_path / "checkpoint.npz"
    _checkpoint(path)
    members = _members(path)
    meta = json.loads(bytes(members["meta"]).decode())
    meta["state"]["privacy_ledger"]["entries"][0]["noise_multiplier"] = 1000.0  # hide the spend
    members["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _rewrite(path, members)
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path)


def test_an_edited_byte_in_the_file_is_refused(tmp_path):
    path = tmp_path / "checkpoint.npz"
    _checkpoint(path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(np.arange(6, dtype=np.float32).tobytes())
    assert at > 0
    data[at + 5] ^= 0x01  # one bit of the global adapter, the zip's CRC left as it was
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_a_truncated_checkpoint_is_refused(tmp_path, keep):
    path = tmp_path / "checkpoint.npz"
    _checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "truncated" in err.value.reason and err.value.path == path


def test_a_file_that_is_not_an_npz_is_refused(tmp_path):
    path = tmp_path / "checkpoint.npz"
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.write_bytes(path.with_suffix(".npy").read_bytes())  # a bare .npy under the checkpoint's name
    with pytest.raises(CheckpointError, match="not an npz"):
        load_checkpoint(path)
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(CheckpointError, match="not an npz"):
        load_checkpoint(path)


class _Pwn:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        # Unpickling calls open(target, "w"): it creates the file.
        return (open, (self.target, "w"))


def test_a_pickle_bearing_npz_is_refused_without_running_it(tmp_path):
    path = tmp_path / "checkpoint.npz"
    _checkpoint(path)
    members = _members(path)
    ran = tmp_path / "pickle-ran"
    members["array_reference"] = np.array([_Pwn(str(ran))], dtype=object)
    _rewrite(path, members)  # np.savez pickles the object array
    assert not ran.exists()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "pickle" in err.value.reason and "array_reference" in err.value.reason
    assert not ran.exists()
    with np.load(path, allow_pickle=True) as data:
        data["array_reference"]  # the payload is live: a loader that unpickles runs it
    assert ran.exists()


def test_a_consistent_checkpoint_with_a_malformed_ledger_is_refused(tmp_path):
    """Even with a recomputed digest, a ledger entry that is not a spend is refused."""
    path = tmp_path / "checkpoint.npz"
    bad = {"entries": [{"client": "0", "round": 1, "unit": "sample", "noise_multiplier": "a lot",
                        "sample_rate": 0.1, "steps": 5, "delta": 1e-5}]}
    save_checkpoint(path, Checkpoint(round=1, global_arrays=[np.zeros(3, np.float32)],
                                     state={"privacy_ledger": bad}))
    with pytest.raises(CheckpointError, match="ledger is malformed: entry 0: noise_multiplier"):
        load_checkpoint(path)


# -- the client's own files -------------------------------------------------------------
def test_a_malformed_spend_line_is_refused_not_skipped(tmp_path):
    log = SpendLog(tmp_path, "e", 0)
    log.append([(1.2, 0.1, 5, 1), (1.2, 0.1, 5, 2)])
    lines = log.path.read_text().splitlines()
    for bad in ('[1.2, 0.1, 5]', '[1.2, 7.0, 5, 2]', '{"sigma": 1.2}', '[1.2, 0.1, "5", 2]', ''):
        log.path.write_text("\n".join([lines[0], bad, lines[1]]) + "\n")
        with pytest.raises(ClientStateError) as err:
            log.history()
        assert f"{log.path} line 2" in str(err.value)
    # A line cut short at the end (a crash mid-write; that update was never sent) is skipped.
    log.path.write_text("\n".join(lines) + "\n[1.2, 0.")
    assert [h[3] for h in log.history()] == [1, 2]


def test_an_entry_appended_after_a_torn_line_is_kept(tmp_path):
    """The entry written after a crash is not glued to the torn line (and lost with it)."""
    log = SpendLog(tmp_path, "e", 0)
    log.append([(1.2, 0.1, 5, 1)])
    with open(log.path, "a") as fh:
        fh.write("[1.2, 0.1")  # the crash
    log.append([(1.2, 0.1, 5, 3)])
    assert [h[3] for h in SpendLog(tmp_path, "e", 0).history()] == [1, 3]


def test_a_residual_holding_a_pickle_or_nan_is_refused(tmp_path):
    residual = Residual(tmp_path, "e", 0)
    residual.path.parent.mkdir(parents=True)
    ran = tmp_path / "pickle-ran"
    np.save(residual.path, np.array([_Pwn(str(ran))], dtype=object), allow_pickle=True)
    with pytest.raises(ClientStateError, match="residual is refused"):
        residual.load(1)
    assert not ran.exists()
    np.save(residual.path, np.array([1.0, np.nan], np.float32))
    with pytest.raises(ClientStateError, match="NaN"):
        residual.load(2)


# -- the audit log ----------------------------------------------------------------------
def _audited_run(run_dir, rounds=3):
    rec = RunRecorder(run_dir, {"federation": {"num_clients": 2}}, privacy_unit="none", delta=None,
                      num_rounds=rounds, echo=lambda _: None, experiment_id="exp")
    trail = AuditTrail(run_dir, rec.config)
    rec.listeners.append(trail)
    trail.start(rec)
    for rnd in range(rounds + 1):
        rec.on_evaluate(rnd, 1.0 / (rnd + 1), {"accuracy": 0.5 + 0.1 * rnd})
    rec.finalize()
    key = read_key(next((run_dir.parent / "keys").glob("exp-*.key")))
    return run_dir / AUDIT_FILE, key


def test_an_edited_audit_line_is_caught_with_the_key(tmp_path):
    path, key = _audited_run(tmp_path / "run")
    assert verify_audit(path, key) == []
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b'"accuracy":0.7', b'"accuracy":0.9')  # round 2
    path.write_bytes(b"\n".join(lines))
    problems = verify_audit(path, key)
    assert any(p.startswith(f"line 4: {MAC_FIELD} does not match") for p in problems)


def test_a_rewritten_chain_is_caught_with_the_key_but_not_without(tmp_path):
    """Someone who can write the file edits a round and recomputes every prev_sha256
    (and results.json's pins): the plain hash chain is whole again; the MACs are not."""
    run_dir = tmp_path / "run"
    path, key = _audited_run(run_dir)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[2]["accuracy"] = 0.99  # round 1
    prev, out = GENESIS, []
    for record in records:
        record["prev_sha256"] = prev
        line = json.dumps(record, separators=(",", ":")).encode()
        prev = hashlib.sha256(line).hexdigest()
        out.append(line)
    path.write_bytes(b"\n".join(out) + b"\n")
    results = json.loads((run_dir / "results.json").read_text())
    digests = [hashlib.sha256(line).hexdigest() for line in out]
    for holder in [*results["rounds"], results["final"]]:
        holder["audit"]["sha256"] = digests[holder["audit"]["line"] - 1]
    (run_dir / "results.json").write_text(json.dumps(results))
    assert verify_audit(path) == []  # the hash chain and the pins cannot tell
    problems = verify_audit(path, key)
    assert any(p.startswith(f"line 3: {MAC_FIELD} does not match") for p in problems)
    # Every later line still carries its old MAC, over a prev_sha256 that has changed.
    assert {p.split(":")[0] for p in problems if MAC_FIELD in p} == {"line 3", "line 4", "line 5", "line 6"}


def test_a_checkpoint_without_its_digest_is_refused(tmp_path):
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(round=1, global_arrays=[np.ones(3, np.float32)]))
    members = _members(path)
    del members["sha256"]  # an older checkpoint, or one whose digest was stripped
    _rewrite(path, members)
    with pytest.raises(CheckpointError, match=r"member\(s\) \['sha256'\] missing"):
        load_checkpoint(path)


def test_a_member_added_with_a_recomputed_digest_is_refused(tmp_path):
    """The structure is checked too: the digest alone would accept what its writer hashed."""
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(round=1, global_arrays=[np.ones(3, np.float32)]))
    members = _members(path)
    del members["sha256"]
    members["global_1"] = np.zeros(3, np.float32)  # more global arrays than meta's num_global
    members["sha256"] = np.frombuffer(content_digest(members).encode(), dtype=np.uint8)
    _rewrite(path, members)
    with pytest.raises(CheckpointError, match="should hold 1 global arrays"):
        load_checkpoint(path)
    meta = json.loads(bytes(members["meta"]).decode())
    meta["round"] = -1
    members = {k: v for k, v in members.items() if k not in ("sha256", "global_1")}
    members["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    members["sha256"] = np.frombuffer(content_digest(members).encode(), dtype=np.uint8)
    _rewrite(path, members)
    with pytest.raises(CheckpointError, match="round is not a non-negative integer"):
        load_checkpoint(path)
