"""Signed decision logs (issue 17): every attack of someone who can write the run directory is
detected and named with the public key; an unsigned log reports what it can and says it is
unsigned.

The attacker's tool here is `_rechain`: it rewrites records and recomputes every ``seq``, ``id``,
``prev`` and ``hash``, which is all an unkeyed chain can ask of a forger.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from lbw_policy.cli import main
from lbw_policy.decision_log import GENESIS, DecisionLog, canonical_json, read_log, record_hash
from lbw_policy.signing import (Signer, SigningKeyError, Witness, generate_keypair, load_signer,
                                read_witness, verify_signature)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    key, pub, fp = generate_keypair(d, "job")
    other_key, other_pub, _ = generate_keypair(d, "attacker")
    return {"key": key, "pub": pub, "fp": fp, "other_key": other_key, "other_pub": other_pub}


def _write_run(run_dir: Path, signer=None, *, n: int = 10, every: int = 4, witness=None,
               close: bool = True, run_id=None) -> list:
    """A run's decisions.jsonl and summary.json as the guard leaves them (run_start, n
    actions, run_end; checkpoints every `every` records and a final one when signed). With
    ``close=False`` the bytes are those a crash leaves (no final checkpoint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "decisions.jsonl"
    log = DecisionLog(path, run={"run_id": run_id or run_dir.name}, signer=signer,
                      checkpoint_every=every, witness=witness)
    signing = {"signing": {"algorithm": "ed25519", "key": log.signer.fingerprint,
                           "checkpoint_every": every}} if signer else {}
    log.append({"step": 0, "event": "run_start", **signing,
                "policy": {"name": "p", "revision": "r" * 64, "description": "d"}})
    for i in range(n):
        log.append({"step": i, "event": "action", "rule": "brake",
                    "actions": [{"actuator": "lr_scale", "applied": 0.5}]})
    log.append({"step": n, "event": "run_end", "rule": None})
    crashed = path.read_bytes()
    log.close()
    if not close:
        path.write_bytes(crashed)
    _summary(run_dir)
    return read_log(path).records


def _summary(run_dir: Path) -> None:
    """summary.json as an attacker who updates it leaves it: the log's true count and head."""
    records = read_log(run_dir / "decisions.jsonl").records
    head = records[-1]["hash"] if records else GENESIS
    (run_dir / "summary.json").write_text(json.dumps({"log": {"records": len(records),
                                                              "head": head}}))


def _rechain(records: list) -> bytes:
    """The attacker's rewrite: fresh seq, id, prev and hash for every record."""
    out, prev = [], GENESIS
    for seq, rec in enumerate(records):
        rec = {k: v for k, v in rec.items() if k != "hash"}
        rec.update(seq=seq, id=f"{rec['run']['run_id']}.{seq}", prev=prev)
        rec["hash"] = prev = record_hash(rec)
        out.append(canonical_json(rec) + b"\n")
    return b"".join(out)


def _store(run_dir: Path, records: list, summary: str = "update") -> None:
    (run_dir / "decisions.jsonl").write_bytes(_rechain(records))
    if summary == "update":
        _summary(run_dir)
    elif summary == "remove":
        (run_dir / "summary.json").unlink()


def _verify(capsys, run_dir, *extra) -> tuple:
    code = main(["verify", str(run_dir), *map(str, extra)])
    out = capsys.readouterr()
    return code, out.out + out.err


def _is_checkpoint(r: dict) -> bool:
    return r["event"] == "checkpoint"


# ----------------------------------------------------------------------------------- attacks
# Each takes the run's records and the run directory and tampers with them; `signed` is the
# text verify --public-key must name (exit 1), `unsigned` the unsigned verify's exit code.


def _rewrite(records, run_dir, keys):
    records[3]["actions"][0]["applied"] = 0.9  # a decision changed, the chain rebuilt
    _store(run_dir, records)


def _delete(records, run_dir, keys):
    del records[2]
    _store(run_dir, records)


def _append_forgery(summary):
    def attack(records, run_dir, keys):
        action = next(r for r in records if r["event"] == "action")
        forged = dict(action, step=99, actions=[{"actuator": "lr_scale", "applied": 1.0}])
        _store(run_dir, records + [forged], summary)
    return attack


def _second_checkpoint(records) -> int:
    """Index of the 2nd checkpoint (not the final one); 9 in an unsigned log of that shape."""
    return ([i for i, r in enumerate(records) if _is_checkpoint(r)] + [4, 9])[1]


def _truncate_at_checkpoint(records, run_dir, keys):
    _store(run_dir, records[:_second_checkpoint(records) + 1])


def _truncate_after_checkpoint(records, run_dir, keys):
    _store(run_dir, records[:_second_checkpoint(records) + 3])


def _splice(records, run_dir, keys):
    other = _write_run(run_dir.parent / "other-run", load_signer(keys["key"]))
    _store(run_dir, records[:4] + other[1:4] + records[4:])


def _swap(records, run_dir, keys):
    _write_run(run_dir.parent / "other-run", load_signer(keys["key"]))
    for name in ("decisions.jsonl", "summary.json"):
        shutil.copy(run_dir.parent / "other-run" / name, run_dir / name)


def _strip_signatures(records, run_dir, keys):
    kept = [r for r in records if not _is_checkpoint(r)]
    kept[0].pop("signing", None)
    _store(run_dir, kept)


def _resign_with_another_key(records, run_dir, keys):
    path = run_dir / "decisions.jsonl"
    path.unlink()
    _write_run(run_dir, load_signer(keys["other_key"]), n=12)  # a whole new, forged log


def _edit_final_checkpoint(records, run_dir, keys):
    # the last record is covered by no later signature: smuggle an action into it
    records[-1]["actions"] = [{"actuator": "lr_scale", "applied": 0.01}]
    _store(run_dir, records)


ATTACKS = {
    # the log: line 1 run_start, checkpoints at lines 5, 10, 15 (after run_end) and 16 (final)
    "rewrite": (_rewrite, ["line 5 (checkpoint, seq 4): the key signed a head of 4 records",
                           "records from line 1 to line 4 were rewritten, deleted or inserted "
                           "and the chain rebuilt"], 0),
    "delete": (_delete, ["line 4 (checkpoint, seq 3): the key signed a head of 4 records",
                         "but 3 records with head"], 0),
    "append-summary-updated": (_append_forgery("update"), [
        "lines 17..17 (1 record(s)) after the last valid checkpoint (line 16, 15 records) are "
        "not covered by any signature: they were appended after the run closed its log"], 0),
    "append-summary-removed": (_append_forgery("remove"), [
        "lines 17..17 (1 record(s)) after the last valid checkpoint", "appended after"], 0),
    "truncate-at-checkpoint": (_truncate_at_checkpoint, [
        "the log ends at line 10 with a checkpoint that is not final", "tail truncation"], 0),
    "truncate-after-checkpoint": (_truncate_after_checkpoint, [
        "lines 11..12 (2 record(s)) after the last valid checkpoint (line 10, 9 records) are "
        "not covered by any signature: the run was killed before it closed its log, or "
        "records were cut from the end"], 0),
    "splice": (_splice, ["line 5: a record of run 'other-run' in run 'run' (spliced in from "
                         "another run's log)",
                         "line 8 (checkpoint, seq 7): the key signed a head of 4 records ("], 0),
    "swap": (_swap, ["log swap: this log was signed in a run directory named 'other-run' "
                     "(run 'other-run') and lies in 'run'"], 0),
    "strip-signatures": (_strip_signatures, [
        "the log is unsigned (its run_start names no signing key), but a public key was given"],
        0),
    "edit-final-checkpoint": (_edit_final_checkpoint, [
        "line 16 (checkpoint, seq 15): the record around the signed statement was edited",
        "unsigned extra fields ['actions']"], 0),
    "another-key": (_resign_with_another_key, ["the log is signed by key ed25519:",
                                                "not by the given key"], 0),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_signed_log_detects_and_names_every_attack(name, keys, tmp_path, capsys):
    attack, expected, _ = ATTACKS[name]
    run_dir = tmp_path / "run"
    records = _write_run(run_dir, load_signer(keys["key"]))
    assert _verify(capsys, run_dir, "--public-key", keys["pub"])[0] == 0
    attack(records, run_dir, keys)
    code, out = _verify(capsys, run_dir, "--public-key", keys["pub"])
    assert code == 1, out
    for text in expected:
        assert text in out, out


@pytest.mark.parametrize("name", [n for n in ATTACKS if n not in (
    "strip-signatures", "another-key", "edit-final-checkpoint")])
def test_unsigned_log_reports_what_it_can_and_says_it_is_unsigned(name, keys, tmp_path, capsys):
    attack, _, unsigned_code = ATTACKS[name]
    run_dir = tmp_path / "run"
    records = _write_run(run_dir)
    keys = dict(keys, key=None)

    def unsigned_run(path, signer=None, **kw):  # the splice / swap donor run, unsigned too
        return _write_run(path, None, **kw)

    if name in ("splice", "swap"):
        other = _write_run(tmp_path / "other-run")
        if name == "splice":
            _store(run_dir, records[:4] + other[1:4] + records[4:])
        else:
            for f in ("decisions.jsonl", "summary.json"):
                shutil.copy(tmp_path / "other-run" / f, run_dir / f)
    else:
        attack(records, run_dir, keys)
    code, out = _verify(capsys, run_dir)
    # every one of these attacks rebuilt the chain and fixed summary.json: the unsigned chain
    # cannot see it, and verify says why
    assert code == unsigned_code, out
    assert "unsigned log: its hash chain detects accidental damage and naive edits only" in out


def test_unsigned_log_detects_what_summary_json_still_contradicts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    records = _write_run(run_dir)
    _store(run_dir, records[:-3], summary="keep")  # cut from the end, summary.json untouched
    code, out = _verify(capsys, run_dir)
    assert code == 1
    assert "log has 9 records, summary.json says 12: records deleted from the end" in out
    assert "unsigned log" in out


def test_garbage_summary_json_is_a_problem_for_an_unsigned_log_and_a_warning_for_a_signed_one(
        keys, tmp_path, capsys):
    plain, signed = tmp_path / "plain", tmp_path / "signed"
    _write_run(plain)
    _write_run(signed, load_signer(keys["key"]))
    for d in (plain, signed):
        (d / "summary.json").write_text("{not json")
    code, out = _verify(capsys, plain)
    assert code == 1
    assert "summary.json cannot be used" in out and "records cut from the end cannot be " \
        "detected" in out
    code, out = _verify(capsys, signed, "--public-key", keys["pub"])
    assert code == 0, out
    assert "warning: summary.json not used" in out


def test_signed_but_unchecked_log_says_so(keys, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_run(run_dir, load_signer(keys["key"]))
    code, out = _verify(capsys, run_dir)
    assert code == 0
    assert f"signed log (key {keys['fp']}, 4 checkpoint(s)); signatures NOT checked" in out


def test_good_signed_log_verifies(keys, tmp_path, capsys):
    run_dir = tmp_path / "run"
    records = _write_run(run_dir, load_signer(keys["key"]))
    code, out = _verify(capsys, run_dir, "--public-key", keys["pub"])
    assert code == 0, out
    assert f"signed by {keys['fp']}: 4 checkpoint(s) valid, the final one covers all 15 " \
        "records before it" in out
    # checkpoints every 4 records (checkpoints not counted), and a final one at close
    cps = [r for r in records if _is_checkpoint(r)]
    assert [c["checkpoint"]["count"] for c in cps] == [4, 9, 14, 15]
    assert [c["checkpoint"]["final"] for c in cps] == [False, False, False, True]
    for c in cps:
        assert c["checkpoint"]["head"] == c["prev"] and c["checkpoint"]["count"] == c["seq"]


def test_run_id_option_checks_the_identity_instead_of_the_directory(keys, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_run(run_dir, load_signer(keys["key"]))
    renamed = tmp_path / "renamed"
    run_dir.rename(renamed)
    code, out = _verify(capsys, renamed, "--public-key", keys["pub"])
    assert code == 1 and "log swap" in out
    assert _verify(capsys, renamed, "--public-key", keys["pub"], "--run-id", "run")[0] == 0
    code, out = _verify(capsys, renamed, "--public-key", keys["pub"], "--run-id", "other")
    assert code == 1
    assert "log swap: this log was signed for run 'run', the run expected is 'other'" in out


# ---------------------------------------------------------------------------------- witness


def test_witness_detects_a_tail_cut_at_a_checkpoint(keys, tmp_path, capsys):
    run_dir, wit = tmp_path / "run", tmp_path / "witness.jsonl"
    records = _write_run(run_dir, load_signer(keys["key"]), witness=wit)
    entries = [e for _, e in read_witness(wit)]
    assert [e["checkpoint"]["count"] for e in entries] == \
        [r["checkpoint"]["count"] for r in records if _is_checkpoint(r)]
    assert _verify(capsys, run_dir, "--public-key", keys["pub"], "--witness", wit)[0] == 0
    _truncate_at_checkpoint(records, run_dir, keys)
    code, out = _verify(capsys, run_dir, "--public-key", keys["pub"], "--witness", wit)
    assert code == 1
    assert "witness line 3: tail truncated: the witness saw a signed checkpoint of 14 " \
        "records, the log's last valid checkpoint covers 9" in out
    assert "witness line 4: tail truncated: the witness saw a signed checkpoint of 15 " \
        "records (final)" in out


def test_witness_detects_a_log_rewritten_by_the_key_holder(keys, tmp_path, capsys):
    wit = tmp_path / "witness.jsonl"
    _write_run(tmp_path / "a" / "run", load_signer(keys["key"]), witness=wit)
    # later, someone with the private key writes another history for the same run and dir
    _write_run(tmp_path / "b" / "run", load_signer(keys["key"]), n=11)
    shutil.copy(tmp_path / "b" / "run" / "decisions.jsonl", tmp_path / "a" / "run")
    _summary(tmp_path / "a" / "run")
    code, out = _verify(capsys, tmp_path / "a" / "run", "--public-key", keys["pub"])
    assert code == 0  # validly signed: only the witness can tell
    code, out = _verify(capsys, tmp_path / "a" / "run", "--public-key", keys["pub"],
                        "--witness", wit)
    assert code == 1
    assert "the log was rewritten and re-signed after the witness saw it (someone holding the " \
        "private key)" in out


def test_witness_callable_and_logger(keys, tmp_path, caplog):
    import logging

    seen = []
    logger = logging.getLogger("lbw-test-witness")
    with caplog.at_level(logging.INFO, logger="lbw-test-witness"):
        _write_run(tmp_path / "run", load_signer(keys["key"]), witness=[seen.append, logger])
    assert len(seen) == 4 and seen[-1]["checkpoint"]["final"] is True
    signer = load_signer(keys["key"])
    assert all(verify_signature(signer.public_key, e["checkpoint"], e["signature"]) for e in seen)
    assert len([r for r in caplog.records if r.name == "lbw-test-witness"]) == 4


def test_a_failing_witness_warns_once_and_the_log_is_complete(keys, tmp_path, capsys):
    def broken(entry):
        raise OSError("disk full")

    with pytest.warns(UserWarning, match="witness .* failed \\(OSError: disk full\\)"):
        _write_run(tmp_path / "run", load_signer(keys["key"]), witness=broken)
    assert _verify(capsys, tmp_path / "run", "--public-key", keys["pub"])[0] == 0


# ---------------------------------------------------------------------------- crash safety


def test_a_crash_leaves_a_log_that_says_it_is_incomplete_and_reopens_cleanly(keys, tmp_path,
                                                                             capsys):
    run_dir = tmp_path / "run"
    _write_run(run_dir, load_signer(keys["key"]), n=9, close=False)
    code, out = _verify(capsys, run_dir, "--public-key", keys["pub"], "--no-summary")
    assert code == 1
    assert "lines 11..13 (3 record(s)) after the last valid checkpoint (line 10, 9 records) " \
        "are not covered by any signature: the run was killed" in out
    # a torn write on top of the crash; the resumed writer cuts it, goes on, and signs it all
    path = run_dir / "decisions.jsonl"
    with open(path, "ab") as fh:
        fh.write(b'{"schema":"lbw-policy/decision/v1","seq":1')
    log = DecisionLog(path, run={"run_id": "run"}, signer=keys["key"], checkpoint_every=4)
    assert log.recovered_torn_bytes > 0
    log.append({"step": 11, "event": "resume", "rule": None})
    log.close()
    code, out = _verify(capsys, run_dir, "--public-key", keys["pub"], "--no-summary")
    assert code == 0, out


def test_a_checkpoint_that_fails_to_write_closes_the_log_and_verify_says_incomplete(
        keys, tmp_path, capsys):
    class FailingSigner(Signer):
        def sign(self, statement):
            if statement["final"]:
                raise OSError("no space left")
            return super().sign(statement)

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(keys["key"]).read_bytes(), None)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError):
        _write_run(run_dir, FailingSigner(key))
    assert read_log(run_dir / "decisions.jsonl").torn_tail is False  # never corrupt
    code, out = _verify(capsys, run_dir, "--public-key", keys["pub"])
    assert code == 1 and "the log ends at line 15 with a checkpoint that is not final" in out


# -------------------------------------------------------------------------------------- keys


def test_keygen_writes_a_private_key_0600_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k"), "--name", "ops"]) == 0
    out = capsys.readouterr().out
    key, pub = tmp_path / "k" / "ops.key", tmp_path / "k" / "ops.pub"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    assert load_signer(key).fingerprint in out
    assert main(["keygen", str(tmp_path / "k"), "--name", "ops"]) == 2
    assert "exists: refusing to overwrite a key" in capsys.readouterr().err


def test_wrong_key_files_are_named(keys, tmp_path, capsys):
    with pytest.raises(SigningKeyError, match="is a public key; signing needs the private key"):
        load_signer(keys["pub"])
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_signer(bad)
    with pytest.raises(SigningKeyError, match="not found"):
        load_signer(tmp_path / "missing.key")
    _write_run(tmp_path / "run", load_signer(keys["key"]))
    code, out = _verify(capsys, tmp_path / "run", "--public-key", keys["key"])
    assert code == 2 and "is a private key; verify with the public key" in out
    code, out = _verify(capsys, tmp_path / "run", "--witness", keys["pub"])
    assert code == 2 and "give --public-key FILE too" in out


def test_witness_of_the_wrong_kind_is_refused():
    with pytest.raises(TypeError, match="witness: expected a file path, a logging.Logger or a "
                                        "callable, found int"):
        Witness([3])


# ----------------------------------------------------------------------- guard and CLI run


def _governed_steps(guard, model, opt, n=12):
    import torch

    torch.manual_seed(0)
    for i in range(n):
        loss = model(torch.randn(8, 4)).pow(2).mean() * (1e3 if i in (8, 9) else 1.0)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()


def test_guard_signs_as_it_writes_with_a_witness_outside_the_run(keys, tmp_path, capsys):
    import torch

    from lbw_policy import Guard

    seen = []
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters())
    guard = Guard(opt, "default", model=model, log_dir=tmp_path / "run", sign_key=keys["key"],
                  witness=[seen.append, tmp_path / "witness.jsonl"], checkpoint_every=2)
    _governed_steps(guard, model, opt)
    guard.close()
    records = read_log(tmp_path / "run" / "decisions.jsonl").records
    start = records[0]
    assert start["event"] == "run_start"
    assert start["signing"] == {"algorithm": "ed25519", "key": keys["fp"], "checkpoint_every": 2}
    assert records[-1]["event"] == "checkpoint" and records[-1]["checkpoint"]["final"]
    assert [e["checkpoint"] for e in seen] == [r["checkpoint"] for r in records
                                               if r["event"] == "checkpoint"]
    code, out = _verify(capsys, tmp_path / "run", "--public-key", keys["pub"], "--witness",
                        tmp_path / "witness.jsonl")
    assert code == 0, out


def test_guard_takes_the_key_from_the_environment(keys, tmp_path, monkeypatch, capsys):
    import torch

    from lbw_policy import Guard

    monkeypatch.setenv("LBW_POLICY_SIGN_KEY", str(keys["key"]))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters())
    with Guard(opt, "default", model=model, log_dir=tmp_path / "run") as guard:
        _governed_steps(guard, model, opt, n=3)
    assert _verify(capsys, tmp_path / "run", "--public-key", keys["pub"])[0] == 0
    monkeypatch.setenv("LBW_POLICY_SIGN_KEY", str(tmp_path / "missing.key"))
    with pytest.raises(SigningKeyError, match="missing.key' not found"):
        Guard(opt, "default", model=model, log_dir=tmp_path / "run2")
    assert not (tmp_path / "run2").exists()  # nothing was applied


def test_cli_run_signs_and_prints_the_witness_to_stdout(shakespeare, keys, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["run", "--data", str(shakespeare), "--steps", "3", "--n-layer", "1",
                     "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--no-progress",
                     "--out", str(tmp_path / "run"), "--sign-key", str(keys["key"])])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    witness = tmp_path / "stdout.txt"
    witness.write_text(out)  # stdout saved is a witness file: the other lines are skipped
    entries = [e for _, e in read_witness(witness) if e is not None]
    assert entries and entries[-1]["checkpoint"]["final"] is True
    code, text = _verify(capsys, tmp_path / "run", "--public-key", keys["pub"], "--witness",
                         witness)
    assert code == 0, text


def test_a_resumed_signed_run_verifies_as_one_log(keys, tmp_path, capsys):
    import torch

    from lbw_policy import Guard

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters())
    guard = Guard(opt, "default", model=model, log_dir=tmp_path / "run", sign_key=keys["key"])
    _governed_steps(guard, model, opt, n=4)
    state = guard.state_dict()
    guard.close()
    resumed = Guard(opt, "default", model=model, log_dir=tmp_path / "run", sign_key=keys["key"],
                    resume=True)
    resumed.load_state_dict(state)
    _governed_steps(resumed, model, opt, n=4)
    resumed.close()
    events = [r["event"] for r in read_log(tmp_path / "run" / "decisions.jsonl").records]
    assert events.count("run_start") == 2 and events[-1] == "checkpoint"
    code, out = _verify(capsys, tmp_path / "run", "--public-key", keys["pub"])
    assert code == 0, out


def test_witness_detects_a_resumed_log_cut_back_to_an_earlier_sessions_end(keys, tmp_path,
                                                                           capsys):
    """A resumed session (here under another run id) appends to the log and ends with its own
    final checkpoint. Cutting the file back to the first session's final checkpoint leaves a
    log that ends well; the witness, which saw the later session's heads, tells."""
    run_dir, wit = tmp_path / "run", tmp_path / "witness.jsonl"
    signer = load_signer(keys["key"])
    _write_run(run_dir, signer, witness=wit, run_id="A")
    first = (run_dir / "decisions.jsonl").read_bytes()
    log = DecisionLog(run_dir / "decisions.jsonl", run={"run_id": "B"}, signer=signer,
                      checkpoint_every=4, witness=wit)
    log.append({"step": 11, "event": "run_start", "signing": {
        "algorithm": "ed25519", "key": signer.fingerprint, "checkpoint_every": 4}})
    for i in range(5):
        log.append({"step": 11 + i, "event": "action", "rule": "brake"})
    log.close()
    _summary(run_dir)
    assert _verify(capsys, run_dir, "--public-key", keys["pub"], "--witness", wit)[0] == 0
    (run_dir / "decisions.jsonl").write_bytes(first)  # the second session cut away
    (run_dir / "summary.json").unlink()
    assert _verify(capsys, run_dir, "--public-key", keys["pub"])[0] == 0  # no witness: fine
    code, out = _verify(capsys, run_dir, "--public-key", keys["pub"], "--witness", wit)
    assert code == 1 and "tail truncated" in out, out
