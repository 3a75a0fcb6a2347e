"""Signed decision receipts and audit heads, checked with a standard JOSE library (PyJWT),
never with our own code."""

import base64
import contextlib
import hashlib
import json
import os
import re
import sqlite3
import stat

import jwt
import pytest

from conftest import (PASSWORD, QUESTION, WIRE, LiveServer, fill_disk, free_port, read_only_view, run_cli, run_out,
                      stored, token_of)
from test_audit_chain import verify_audit
import pausepoint

TEAM = {**QUESTION,
        "recipients": [{"recipient": "ana", "channel": "link"}, {"recipient": "bo", "channel": "link"}],
        "quorum": {"choice": "Approve", "count": 2}}


def checked(api, token):
    """A receipt's claims, as anyone can check them: PyJWT, with the key the server publishes."""
    keys = jwt.PyJWKSet.from_dict(api.get("/.well-known/jwks.json").json)
    kid = jwt.get_unverified_header(token)["kid"]
    return jwt.decode(token, key=keys[kid].key, algorithms=["EdDSA"])


def forged(token, **changes):
    """The same receipt with some claims changed and the original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    changed = base64.urlsafe_b64encode(json.dumps({**claims, **changes}).encode()).rstrip(b"=").decode()
    return f"{header}.{changed}.{signature}"


def test_a_decided_pause_carries_a_receipt_anyone_can_check_and_no_one_can_alter(api):
    key = api.register()["test_api_key"]
    fields = {"amount": {"type": "number", "value": 340, "max": 500, "editable": True}}
    created = api.create_pause(key, fields=fields)
    assert api.pause(key, created["pause_id"])["receipt"] is None           # nothing decided yet
    api.post_json(f"/v1/respond/{token_of(created['respond_url'])}",
                  {"choice": "Approve", "fields": {"amount": 300}, "comment": "only for staging"})
    pause = api.pause(key, created["pause_id"])
    claims = checked(api, pause["receipt"])
    developer_id = api.get("/v1/audit/head", headers=api.as_key(key)).json["developer_id"]
    assert claims == {
        "type": "receipt", "pause_id": pause["pause_id"], "developer_id": developer_id,
        "message_sha256": hashlib.sha256(WIRE["message"].encode()).hexdigest(), "title": None, "details": [],
        "options": WIRE["options"], "quorum": None, "status": "responded", "choice": "Approve", "fields": pause["fields"],
        "edited": {"amount": {"old": 340, "new": 300}},
        "comment_sha256": hashlib.sha256(b"only for staging").hexdigest(), "votes": [],
        "decided_by": pause["decided_by"], "decided_at": pause["decided_at"], "livemode": False}
    for change in ({"choice": "Reject"}, {"fields": {"amount": {"value": 500}}}, {"livemode": True},
                   {"decided_by": "recipient:someone-else"}, {"pause_id": "psr_other"}, {"comment_sha256": None},
                   {"developer_id": "dev_other"}):
        with pytest.raises(jwt.InvalidSignatureError):
            checked(api, forged(pause["receipt"], **change))


def test_a_receipt_signs_other_scripts_as_utf8_and_checks_as_any_other(api):
    """As ASCII escapes, an emoji took 16 bytes of a receipt, which is kept twice (in its pause
    and in its decision's event): 3.6 KB of emoji in a field made two 15 KB receipts."""
    key = api.register()["test_api_key"]
    note = "💸" * 900
    created = api.create_pause(key, channel="link", recipient="ops",
                               fields={"note": {"type": "string", "value": note, "max_length": 1000}})
    api.post_json(f"/v1/respond/{token_of(created['respond_url'])}", {"choice": "Approve"})
    receipt = api.pause(key, created["pause_id"])["receipt"]
    assert checked(api, receipt)["fields"]["note"]["value"] == note
    assert len(receipt) < 2 * len(note.encode())              # its base64, and the rest of the receipt


def test_timeouts_cancels_and_team_decisions_are_signed_too(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    timed_out, cancelled = api.create_pause(key), api.create_pause(key)
    stored(api.config, "UPDATE pauses SET expires_at = '2000-01-01T00:00:00.000Z' WHERE id = ?", timed_out["pause_id"])
    api.step("timeouts")
    api.post(f"/v1/pause/{cancelled['pause_id']}/cancel", headers=api.as_key(key))
    assert checked(api, api.pause(key, timed_out["pause_id"])["receipt"])["choice"] == "Reject"
    assert checked(api, api.pause(key, cancelled["pause_id"])["receipt"])["status"] == "cancelled"
    team = api.post_json("/v1/pause", TEAM, headers=api.as_key(key)).json
    for person, comment in zip(team["recipients"], ("if it passes review", None)):
        api.post_json(f"/v1/respond/{token_of(person['respond_url'])}", {"choice": "Approve", "comment": comment})
    votes = checked(api, api.pause(key, team["pause_id"])["receipt"])["votes"]
    assert [(vote["recipient"], vote["choice"], vote["comment_sha256"]) for vote in votes] == [
        ("ana", "Approve", hashlib.sha256(b"if it passes review").hexdigest()), ("bo", "Approve", None)]


def test_the_key_is_made_once_kept_beside_the_database_for_its_owner_only(running_api):
    api = running_api(fresh=True)
    path = pausepoint.signing_keys_path(api.config["database.path"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = api.get("/.well-known/jwks.json").json
    api.app.runtime.stop()
    assert running_api().get("/.well-known/jwks.json").json == first       # the same key after a restart
    [published] = first["keys"]
    assert (published["kty"], published["crv"], published["alg"]) == ("OKP", "Ed25519", "EdDSA")
    assert "d" not in published                                                        # never the private half


def test_after_a_rotation_old_receipts_still_check_and_new_ones_use_the_new_key(running_api, capsys):
    api = running_api()
    key = api.register()["test_api_key"]
    before = api.create_pause(key)
    api.post(f"/v1/pause/{before['pause_id']}/cancel", headers=api.as_key(key))
    assert pausepoint.main(["--db", api.config["database.path"], "rotate-signing-key"]) == 0
    after = api.create_pause(key)
    api.post(f"/v1/pause/{after['pause_id']}/cancel", headers=api.as_key(key))
    old, new = (api.pause(key, p["pause_id"])["receipt"] for p in (before, after))
    assert jwt.get_unverified_header(old)["kid"] != jwt.get_unverified_header(new)["kid"]
    assert checked(api, old)["pause_id"] == before["pause_id"] and checked(api, new)["pause_id"] == after["pause_id"]
    with open(pausepoint.signing_keys_path(api.config["database.path"]), encoding="utf-8") as f:
        kept = json.load(f)["keys"]
    assert ["private" in k for k in kept] == [False, True] and kept[0]["retired_at"]


def test_a_backup_takes_the_signing_keys_with_it(running_api, tmp_path):
    api = running_api()
    destination = str(tmp_path / "backup.db")
    assert pausepoint.main(["--db", api.config["database.path"], "backup", destination]) == 0
    copied = pausepoint.signing_keys_path(destination)
    assert stat.S_IMODE(os.stat(copied).st_mode) == 0o600
    with open(copied, encoding="utf-8") as f, open(pausepoint.signing_keys_path(api.config["database.path"]),
                                                   encoding="utf-8") as g:
        assert json.load(f) == json.load(g)


def test_a_backup_that_could_not_be_started_is_refused_before_anything_is_written(running_api, tmp_path, capsys):
    api = running_api()
    key = api.register()["test_api_key"]
    api.post(f"/v1/pause/{api.create_pause(key)['pause_id']}/cancel", headers=api.as_key(key))
    db, keys = api.config["database.path"], pausepoint.signing_keys_path(api.config["database.path"])
    # A keys file already where the copy's would go (an older backup's, its database deleted).
    backups = tmp_path / "backups"
    backups.mkdir()
    destination = str(backups / "backup.db")
    with open(pausepoint.signing_keys_path(destination), "w") as f:
        f.write('{"keys": []}')
    assert pausepoint.main(["--db", db, "backup", destination]) == 2
    assert "backup.db.keys.json already exists; choose a new file name" in capsys.readouterr().err
    # The database's own keys gone: its receipts could no longer be checked from the copy.
    os.rename(keys, keys + ".elsewhere")
    assert pausepoint.main(["--db", db, "backup", str(backups / "other.db")]) == 2
    assert "are missing, and it holds receipts signed with them" in capsys.readouterr().err
    assert os.listdir(backups) == ["backup.db.keys.json"]


def test_the_audit_head_is_signed(api):
    key = api.register()["api_key"]
    api.create_pause(key, channel="link", recipient="ops")
    head = api.get("/v1/audit/head", headers=api.as_key(key)).json
    claims = checked(api, head["signature"])
    assert claims == {name: head[name] for name in ("type", "developer_id", "livemode", "hash", "count", "at")}
    assert claims["type"] == "audit_head"       # so it cannot pass for a receipt, nor a receipt for it
    assert claims["count"] == 1 and claims["livemode"] is True
    with pytest.raises(jwt.InvalidSignatureError):
        checked(api, forged(head["signature"], count=0))


def test_a_keys_file_gone_while_serving_never_stops_a_decision(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    os.chmod(pausepoint.signing_keys_path(api.config["database.path"]), 0)       # unreadable (not as root)
    os.rename(pausepoint.signing_keys_path(api.config["database.path"]), str(api.config["database.path"]) + ".moved")
    created = api.create_pause(key)
    stored(api.config, "UPDATE pauses SET expires_at = '2000-01-01T00:00:00.000Z' WHERE id = ?", created["pause_id"])
    api.step("timeouts")
    assert checked(api, api.pause(key, created["pause_id"])["receipt"])["status"] == "timed_out"


def test_a_database_with_receipts_never_starts_with_a_new_key_by_mistake(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    api.post(f"/v1/pause/{api.create_pause(key)['pause_id']}/cancel", headers=api.as_key(key))
    api.app.runtime.stop()
    os.remove(pausepoint.signing_keys_path(api.config["database.path"]))
    with pytest.raises(pausepoint.ConfigError, match="keys.json is missing, but this database holds receipts"):
        pausepoint.create_app(api.config)


def test_a_keys_file_lost_with_no_backup_can_be_replaced_and_says_what_is_lost(running_api, capsys):
    api = running_api()
    db, path = api.config["database.path"], pausepoint.signing_keys_path(api.config["database.path"])
    key = api.register()["test_api_key"]
    before = api.create_pause(key)
    api.post(f"/v1/pause/{before['pause_id']}/cancel", headers=api.as_key(key))
    lost = jwt.get_unverified_header(api.pause(key, before["pause_id"])["receipt"])["kid"]
    api.app.runtime.stop()
    with open(path, encoding="utf-8") as f:
        kept = f.read()
    assert pausepoint.main(["--db", db, "rotate-signing-key", "--keys-lost"]) == 2      # there is a file
    assert "exists: --keys-lost makes a keys file only where there is none" in capsys.readouterr().err
    os.remove(path)
    with contextlib.closing(pausepoint.only_server(db)):                 # a server running on it
        assert pausepoint.main(["--db", db, "rotate-signing-key", "--keys-lost"]) == 2
    assert "a server is running on this database" in capsys.readouterr().err and not os.path.exists(path)
    lock = pausepoint.server_lock_path(db)
    os.replace(lock, lock + ".kept")
    os.symlink("/nonexistent", lock)                                     # a lock that cannot be read to tell
    assert pausepoint.main(["--db", db, "rotate-signing-key", "--keys-lost"]) == 2
    assert "whether a server runs on this database cannot be told" in capsys.readouterr().err
    os.replace(lock + ".kept", lock)
    assert not os.path.exists(path)
    assert pausepoint.main(["--db", db, "rotate-signing-key", "--keys-lost"]) == 0
    assert f"those signed with {lost} and earlier keys can no longer be checked" in capsys.readouterr().out
    api = running_api(**{"database.path": db})                           # it starts again
    after = api.create_pause(key)
    api.post(f"/v1/pause/{after['pause_id']}/cancel", headers=api.as_key(key))
    assert checked(api, api.pause(key, after["pause_id"])["receipt"])["pause_id"] == after["pause_id"]
    assert lost not in {published["kid"] for published in api.get("/.well-known/jwks.json").json["keys"]}
    assert pausepoint.main(["--db", db, "rotate-signing-key"]) == 0     # and rotates as ever
    assert json.loads(kept)["keys"][0]["kid"] == lost


def test_keys_lost_is_refused_for_a_database_named_by_a_link_whose_own_keys_are_there(running_api, capsys):
    """A database named by a symbolic link finds no keys beside the link's name: its own, beside
    its real name, are not lost, and a new file would leave every receipt signed with them unchecked."""
    api = running_api()
    db = api.config["database.path"]
    key = api.register()["test_api_key"]
    api.post(f"/v1/pause/{api.create_pause(key)['pause_id']}/cancel", headers=api.as_key(key))
    api.app.runtime.stop()
    link = os.path.join(os.path.dirname(db), "linked.db")
    os.symlink(db, link)
    assert pausepoint.main(["--db", link, "rotate-signing-key", "--keys-lost"]) == 2
    said = capsys.readouterr().err
    real = os.path.realpath(db)
    assert pausepoint.signing_keys_path(real) in said and f"name the database {real}" in said
    assert not os.path.lexists(pausepoint.signing_keys_path(link))


@pytest.mark.parametrize("content", ["", "{", '{"keys": []}', '{"keys": [{"kid": "k", "public": "x"}]}', '{"keys": [1]}',
                                     '{"keys": "abc"}', '{"keys": [{"kid": "k", "private": "eA"}]}'])
def test_an_unusable_keys_file_stops_start_up_with_a_sentence_naming_it(tmp_path, content):
    from conftest import make_config
    config = make_config(tmp_path)
    with open(pausepoint.signing_keys_path(config["database.path"]), "w") as f:
        f.write(content)
    with pytest.raises(pausepoint.ConfigError, match=r"the signing keys file .*keys\.json cannot be used"):
        pausepoint.create_app(config)


def test_processes_starting_at_once_end_up_with_one_whole_keys_file(tmp_path):
    import concurrent.futures
    path = str(tmp_path / "race.db.keys.json")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        kids = set(pool.map(lambda _: pausepoint.Signer(path).current[0], range(40)))
    assert len(kids) == 1
    assert [name for name in os.listdir(tmp_path) if name.startswith(".keys-")] == []


def test_a_first_start_on_a_full_disk_says_in_a_sentence_why_it_cannot_start(small_disk):
    """Where the keys file cannot be written, the operator is told what to free, not shown a traceback."""
    fill_disk(small_disk)
    done = run_cli(small_disk)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pausepoint.db.keys.json cannot be made (No space left on device): free space on its disk" in done.stderr


def test_rotations_at_once_lose_no_key(tmp_path):
    import concurrent.futures
    path = str(tmp_path / "rotate.db.keys.json")
    first = pausepoint.Signer(path).current[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = set(pool.map(lambda _: pausepoint.rotate_signing_key(path), range(16)))
    with open(path, encoding="utf-8") as f:
        keys = json.load(f)["keys"]
    assert {key["kid"] for key in keys} == made | {first} and len(keys) == 17
    assert sum("private" in key for key in keys) == 1


def test_a_burst_of_timeouts_signs_each_its_own_receipt_saying_what_the_pause_says(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    api.create_pause(key, fields={"amount": {"type": "number", "value": 340, "editable": True}}, title="Wire",
                     metadata={"payee": "ACME", "display": ["payee"]})
    team = api.post_json("/v1/pause", TEAM, headers=api.as_key(key)).json
    api.post_json(f"/v1/respond/{token_of(team['recipients'][0]['respond_url'])}", {"choice": "Approve"})
    burst = pausepoint.JOB_BATCH + 34                   # signed ahead, batch after batch
    stored(api.config, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
                       " INSERT INTO pauses (id, developer_id, livemode, recipient, channel, title, message, options,"
                       " timeout_default, metadata, fields, respond_token, created_at, expires_at)"
                       " SELECT 'psr_' || i, developer_id, 0, recipient, channel, title, message, options,"
                       " timeout_default, metadata, fields, 'tok' || i, created_at, expires_at"
                       " FROM n, pauses WHERE pauses.seq = 1", burst)
    stored(api.config, "UPDATE pauses SET expires_at = '2000-01-01T00:00:00.000Z'")
    api.step("timeouts")
    pauses = [api.pause(key, pause_id) for (pause_id,) in stored(api.config, "SELECT id FROM pauses")]
    assert len(pauses) == burst + 2
    assert {checked(api, pause["receipt"])["developer_id"] for pause in pauses} == {
        api.get("/v1/audit/head", headers=api.as_key(key)).json["developer_id"]}
    for pause in pauses:
        claims = checked(api, pause["receipt"])
        assert claims == {
            "type": "receipt", "pause_id": pause["pause_id"], "developer_id": claims["developer_id"],
            "message_sha256": hashlib.sha256(WIRE["message"].encode()).hexdigest(), "title": pause.get("title"),
            "details": [{"name": "payee", "value": "ACME"}] if pause.get("title") else [],     # as the page shows
            "options": WIRE["options"], "quorum": pause.get("quorum"), "status": "timed_out", "choice": "Reject",
            "fields": pause.get("fields"),
            "edited": pause.get("edited"), "comment_sha256": None, "votes": claims["votes"], "decided_by": "timeout",
            "decided_at": pause["decided_at"], "livemode": False}
    assert [vote["recipient"] for vote in checked(api, api.pause(key, team["pause_id"])["receipt"])["votes"]] == ["ana"]


def test_a_pause_decided_after_its_timeout_was_signed_ahead_keeps_its_own_decision(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    timed_out, cancelled = api.create_pause(key), api.create_pause(key)
    stored(api.config, "UPDATE pauses SET expires_at = '2000-01-01T00:00:00.000Z'")
    conn = api.app.runtime.db()
    batch = pausepoint.due_batch(conn, ("", 0))         # read and signed as timing out…
    with pausepoint.transaction(conn):          # …then cancelled, its clock read before the expiry
        assert pausepoint.decide_pause(conn, api.config, cancelled["pause_id"], "cancelled", "api:pp_test_…",
                                       now="1999-12-31T23:59:59.000Z")
    assert pausepoint.time_out(conn, api.config, batch) == 1
    assert checked(api, api.pause(key, cancelled["pause_id"])["receipt"])["status"] == "cancelled"
    assert checked(api, api.pause(key, timed_out["pause_id"])["receipt"])["status"] == "timed_out"
    assert stored(api.config, "SELECT event_type FROM audit_events WHERE pause_id = ? AND event_type != 'pause.created'",
                  cancelled["pause_id"]) == [("pause.cancelled",)]


def test_a_vote_that_lands_after_a_team_pause_was_read_for_its_timeout_is_in_its_receipt(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    three = {**TEAM, "recipients": [*TEAM["recipients"], {"recipient": "cy", "channel": "link"}],
             "quorum": {"choice": "Approve", "count": 3}}
    team = api.post_json("/v1/pause", three, headers=api.as_key(key)).json
    api.post_json(f"/v1/respond/{token_of(team['recipients'][0]['respond_url'])}", {"choice": "Approve"})
    stored(api.config, "UPDATE pauses SET expires_at = '2000-01-01T00:00:00.000Z'")
    conn = api.app.runtime.db()
    batch = pausepoint.due_batch(conn, ("", 0))
    # bo's vote, its clock read before the expiry, commits only now (as a racing answer can)
    stored(api.config, "UPDATE pause_recipients SET choice = 'Approve', voted_at = '1999-12-31T23:59:59.000Z'"
                       " WHERE pause_id = ? AND recipient = 'bo'", team["pause_id"])
    assert pausepoint.time_out(conn, api.config, batch) == 1
    votes = checked(api, api.pause(key, team["pause_id"])["receipt"])["votes"]
    assert [vote["recipient"] for vote in votes] == ["bo", "ana"]


def test_a_database_with_receipts_never_starts_with_another_keys_file(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    api.post(f"/v1/pause/{api.create_pause(key)['pause_id']}/cancel", headers=api.as_key(key))
    api.app.runtime.stop()
    path = pausepoint.signing_keys_path(api.config["database.path"])
    os.remove(path)
    pausepoint.create_signing_keys(path)                # someone else's, or a fresh one
    with pytest.raises(pausepoint.ConfigError, match="does not hold the key ppk_"):
        pausepoint.create_app(api.config)


def test_a_pause_with_a_lone_surrogate_from_an_older_version_is_decided_and_signed(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    old, other = api.create_pause(key), api.create_pause(key)
    stored(api.config, "UPDATE pauses SET fields = ?, expires_at = '2000-01-01T00:00:00.000Z'",
           '{"memo":{"type":"string","value":"\\ud800 alone","editable":false}}')
    api.step("timeouts")
    for pause in (old, other):
        assert checked(api, api.pause(key, pause["pause_id"])["receipt"])["status"] == "timed_out"


@pytest.mark.parametrize("put_back", ["an older copy", "the retired key's private half",
                                      "the retired key's public half changed"])
def test_a_keys_file_that_would_unpublish_or_go_back_to_a_key_is_refused_while_serving(running_api, caplog, put_back):
    api = running_api()
    key = api.register()["test_api_key"]
    path = pausepoint.signing_keys_path(api.config["database.path"])
    with open(path, encoding="utf-8") as f:
        older = json.load(f)["keys"]
    assert pausepoint.main(["--db", api.config["database.path"], "rotate-signing-key"]) == 0
    first = api.create_pause(key)
    api.post(f"/v1/pause/{first['pause_id']}/cancel", headers=api.as_key(key))
    with open(path, encoding="utf-8") as f:
        retired, newest = json.load(f)["keys"]
    keys = {"an older copy": older,
            "the retired key's private half": [older[0], {n: v for n, v in newest.items() if n != "private"}],
            "the retired key's public half changed": [{**retired, "public": pausepoint.new_signing_key()["public"]},
                                                      newest]}[put_back]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"keys": keys}, f)
    second = api.create_pause(key)
    api.post(f"/v1/pause/{second['pause_id']}/cancel", headers=api.as_key(key))
    # Still the newest key, still published: every receipt issued stays checkable.
    receipts = [api.pause(key, p["pause_id"])["receipt"] for p in (first, second)]
    assert [jwt.get_unverified_header(r)["kid"] for r in receipts] == [newest["kid"]] * 2
    assert [checked(api, r)["pause_id"] for r in receipts] == [first["pause_id"], second["pause_id"]]
    assert "signing with the key already loaded" in caplog.text


def test_a_keys_file_whose_private_key_is_not_its_public_ones_stops_start_up(tmp_path):
    from conftest import make_config
    config = make_config(tmp_path)
    mine, other = pausepoint.new_signing_key(), pausepoint.new_signing_key()
    pausepoint.write_signing_keys(pausepoint.signing_keys_path(config["database.path"]),
                                  [{**mine, "public": other["public"]}])
    with pytest.raises(pausepoint.ConfigError, match="is not the one its public key and kid name"):
        pausepoint.create_app(config)


def test_a_keys_file_others_can_read_is_warned_of_at_start(running_api, caplog):
    api = running_api()
    api.app.runtime.stop()
    os.chmod(pausepoint.signing_keys_path(api.config["database.path"]), 0o644)
    pausepoint.create_app(api.config).runtime.stop()
    assert "others than its owner may read or write the signing keys file" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_rotation_run_as_root_leaves_the_keys_file_to_its_owner(running_api):
    api = running_api()
    path = pausepoint.signing_keys_path(api.config["database.path"])
    os.chown(path, 12345, 12346)            # the service's user, say
    assert pausepoint.main(["--db", api.config["database.path"], "rotate-signing-key"]) == 0
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (12345, 12346)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_keys_file_changed_before_the_first_signature_is_refused_and_logged_too(running_api, caplog):
    api = running_api()
    key = api.register()["test_api_key"]
    path = pausepoint.signing_keys_path(api.config["database.path"])
    with open(path, encoding="utf-8") as f:
        [loaded] = json.load(f)["keys"]
    pausepoint.write_signing_keys(path, [pausepoint.new_signing_key()])      # another server's, say
    created = api.create_pause(key)
    api.post(f"/v1/pause/{created['pause_id']}/cancel", headers=api.as_key(key))
    receipt = api.pause(key, created["pause_id"])["receipt"]
    assert jwt.get_unverified_header(receipt)["kid"] == loaded["kid"] and checked(api, receipt)
    assert "signing with the key already loaded" in caplog.text


def test_a_backup_or_rotation_whose_keys_would_not_start_the_server_is_refused(running_api, tmp_path, capsys):
    api = running_api()
    key = api.register()["test_api_key"]
    api.post(f"/v1/pause/{api.create_pause(key)['pause_id']}/cancel", headers=api.as_key(key))
    db, path = api.config["database.path"], pausepoint.signing_keys_path(api.config["database.path"])
    os.rename(path, path + ".elsewhere")
    assert pausepoint.main(["--db", db, "rotate-signing-key"]) == 2           # it would invent a key
    assert "is missing, but this database holds receipts" in capsys.readouterr().err and not os.path.exists(path)
    pausepoint.write_signing_keys(path, [pausepoint.new_signing_key()])       # another server's keys
    backups = tmp_path / "backups"
    backups.mkdir()
    assert pausepoint.main(["--db", db, "backup", str(backups / "copy.db")]) == 2
    assert "the backup would not start with " in capsys.readouterr().err
    assert os.listdir(backups) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_files_a_rotation_run_as_root_makes_belong_to_the_databases_owner(running_api):
    api = running_api()
    db, path = api.config["database.path"], pausepoint.signing_keys_path(api.config["database.path"])
    api.app.runtime.stop()
    os.remove(path)                         # no receipts yet: a rotation makes the file
    os.chown(db, 12345, 12346)
    assert pausepoint.main(["--db", db, "rotate-signing-key"]) == 0
    for made in (path, path + ".lock"):
        assert (os.stat(made).st_uid, os.stat(made).st_gid) == (12345, 12346), made


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_files_a_command_run_as_root_makes_where_there_is_no_database_yet_belong_to_the_directorys_owner(
        running_api, tmp_path):
    """`sudo … create-developer` before the first start, or `sudo … restore` where the database
    was lost: the server, run as the directory's owner, could otherwise not open them. A
    backup's copy and its keys go to the owner of the directory they are written to too."""
    api = running_api()
    api.register()
    for name in ("backups", "made", "restored"):
        (tmp_path / name).mkdir()
        os.chown(tmp_path / name, 12345, 12346)         # the service's user, say
    backup = str(tmp_path / "backups" / "pausepoint.db")
    assert pausepoint.main(["--db", api.config["database.path"], "backup", backup]) == 0
    assert run_cli(tmp_path / "made", "create-developer", "--email", "ops@example.com", "--name", "Ops",
                   "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    assert pausepoint.main(["--db", str(tmp_path / "restored" / "pausepoint.db"), "restore", backup]) == 0
    for name in ("backups", "made", "restored"):
        found = {made: (os.stat(tmp_path / name / made).st_uid, os.stat(tmp_path / name / made).st_gid)
                 for made in os.listdir(tmp_path / name)}
        assert "pausepoint.db" in found and set(found.values()) == {(12345, 12346)}, found


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
@pytest.mark.parametrize("planted", ["symbolic link", "hard link", "fifo"])
@pytest.mark.parametrize("lock", [".keys.json.lock", ".server.lock"])
def test_a_lock_file_planted_beside_the_database_is_never_given_away_nor_waited_on(running_api, tmp_path, lock,
                                                                                    planted):
    """Whoever may write the database's directory could otherwise have root, running the
    server or a rotation with sudo, hand them any file (/etc/shadow, say), or hang."""
    api = running_api()
    db = api.config["database.path"]
    api.app.runtime.stop()
    victim = tmp_path / "elsewhere" / "root-only"
    victim.parent.mkdir()
    victim.write_text("secret")
    os.chmod(victim, 0o600)
    os.chown(db, 12345, 12346)              # the directory's owner, say
    {"symbolic link": os.symlink, "hard link": os.link}.get(planted, lambda _, path: os.mkfifo(path))(victim, db + lock)
    argv = ["rotate-signing-key"] if lock == ".keys.json.lock" else ["--port", str(free_port()), "serve"]
    if planted == "hard link" and lock == ".server.lock":     # a plain file, there before: used, not given away
        pausepoint.only_server(db).close()
    elif planted == "hard link":
        assert pausepoint.main(["--db", db, *argv]) == 0
    else:
        assert pausepoint.main(["--db", db, *argv]) == 2
    assert (os.stat(victim).st_uid, stat.S_IMODE(os.stat(victim).st_mode), victim.read_text()) == (0, 0o600, "secret")


def test_a_keys_file_with_a_public_half_that_is_no_key_stops_start_up_with_a_sentence(tmp_path):
    from conftest import make_config
    config = make_config(tmp_path)
    pausepoint.write_signing_keys(pausepoint.signing_keys_path(config["database.path"]),
                                  [{"kid": "ppk_pasted", "public": "AAAAA"}, pausepoint.new_signing_key()])
    with pytest.raises(pausepoint.ConfigError, match=r"the signing keys file .*keys\.json cannot be used"):
        pausepoint.create_app(config)


def test_a_rotation_in_a_directory_it_may_not_write_says_why_in_one_sentence(running_api, tmp_path, capsys):
    api = running_api()
    (tmp_path / "served").mkdir()
    assert pausepoint.main(["--db", api.config["database.path"], "backup", str(tmp_path / "served" / "copy.db")]) == 0
    with read_only_view(tmp_path / "served", tmp_path / "read-only") as view:
        seen = str(view / "copy.db")
        keys = pausepoint.signing_keys_path(seen)
        with open(keys, "rb") as f:
            before = f.read()
        # A server has it open, so its -shm file is there: the rotation gets as far as its lock.
        with contextlib.closing(sqlite3.connect(tmp_path / "served" / "copy.db")) as db:
            db.execute("SELECT count(*) FROM pauses").fetchone()
            assert pausepoint.main(["--db", seen, "rotate-signing-key"]) == 2
        with open(keys, "rb") as f:
            assert f.read() == before
    assert capsys.readouterr().err == (f"pausepoint: the signing keys file {keys} was not rotated: {keys}.lock:"
                                       " Read-only file system\n")


def test_a_keys_file_from_before_a_rotation_is_refused_though_an_older_pause_was_decided_since(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    asked_first, asked_later = api.create_pause(key), api.create_pause(key)
    api.post(f"/v1/pause/{asked_later['pause_id']}/cancel", headers=api.as_key(key))
    path = pausepoint.signing_keys_path(api.config["database.path"])
    with open(path, encoding="utf-8") as f:
        before_rotation = f.read()
    assert pausepoint.main(["--db", api.config["database.path"], "rotate-signing-key"]) == 0
    # The pause asked first is decided last, with the new key: the database's latest receipt.
    api.post(f"/v1/pause/{asked_first['pause_id']}/cancel", headers=api.as_key(key))
    newest = jwt.get_unverified_header(api.pause(key, asked_first["pause_id"])["receipt"])["kid"]
    api.app.runtime.stop()
    with open(path, "w", encoding="utf-8") as f:
        f.write(before_rotation)                        # a backup of the keys made before the rotation
    with pytest.raises(pausepoint.ConfigError, match=f"does not hold the key {newest} that signed"):
        pausepoint.create_app(api.config)


def test_a_restore_keeps_keys_made_since_the_backup_and_puts_the_backups_back_where_they_are_gone(running_api,
                                                                                                 tmp_path, capsys):
    """A rotation since the backup signed receipts handed out since: the keys beside the database
    hold that key and every one before, so a restore keeps them; the backup's, without it, would
    leave those receipts unchecked. Lost with the disk, the backup's are put in their place."""
    api = running_api()
    db, path = api.config["database.path"], pausepoint.signing_keys_path(api.config["database.path"])
    key = api.register()["test_api_key"]
    api.post(f"/v1/pause/{api.create_pause(key)['pause_id']}/cancel", headers=api.as_key(key))
    api.app.runtime.stop()
    (tmp_path / "backups").mkdir()
    copy = str(tmp_path / "backups" / "copy.db")
    assert pausepoint.main(["--db", db, "backup", copy]) == 0
    assert pausepoint.main(["--db", db, "rotate-signing-key"]) == 0
    with open(path, encoding="utf-8") as f:
        rotated = json.load(f)
    capsys.readouterr()
    assert pausepoint.main(["--db", db, "restore", copy]) == 0
    assert "keeping its signing keys" in capsys.readouterr().out
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == rotated
    os.remove(path)
    assert pausepoint.main(["--db", db, "restore", copy]) == 0
    assert f"and its signing keys from {copy}.keys.json" in capsys.readouterr().out
    with open(path, encoding="utf-8") as f, open(pausepoint.signing_keys_path(copy), encoding="utf-8") as g:
        assert json.load(f) == json.load(g)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.remove(path)
    os.remove(pausepoint.signing_keys_path(copy))           # and the backup's are gone too
    assert pausepoint.main(["--db", db, "restore", copy]) == 2
    assert "the backup's signing keys" in capsys.readouterr().err and not os.path.exists(path)


def test_a_restore_of_a_database_no_server_has_started_on_says_it_has_no_keys_yet(tmp_path):
    """Made by create-developer, backed up and restored before a first start: neither has keys,
    and none are kept; the start makes them."""
    assert run_cli(tmp_path, "create-developer", "--email", "ops@example.com", "--name", "Ops", "--password-stdin",
                   stdin=PASSWORD + "\n").returncode == 0
    copy = str(tmp_path / "copy.db")
    assert "no signing keys beside it" in run_cli(tmp_path, "backup", copy).stdout
    restored = run_cli(tmp_path, "restore", copy)
    assert restored.returncode == 0 and "keeping its signing keys" not in restored.stdout
    assert "with no signing keys beside either: the server makes them at its next start" in restored.stdout
    assert not os.path.exists(pausepoint.signing_keys_path(str(tmp_path / "pausepoint.db")))


def readme_receipt_check(url):
    """The README's receipt check, asking `url` for the keys: check(receipt, pause_id) runs it."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
              encoding="utf-8") as f:
        snippet = re.search(r"```python\n(import jwt, requests.*?)```", f.read(), re.S).group(1)
    code = compile(snippet.replace("https://pausepoint.example.org", url), "README receipt check", "exec")

    def check(receipt, pause_id):
        exec(code, {"receipt": receipt, "pause_id": pause_id})
    return check


def test_the_readme_receipt_check_takes_a_persons_approval_and_nothing_else(api):
    key = api.register()["api_key"]
    answered, timed_out, other = (api.create_pause(key, channel="link", recipient="ops", timeout_default="Approve")
                                  for _ in range(3))
    for pause in (answered, other):
        api.post_json(f"/v1/respond/{token_of(pause['respond_url'])}", {"choice": "Approve"})
    run_out(api.config, timed_out["pause_id"])
    api.step("timeouts")
    receipt = {pause["pause_id"]: api.pause(key, pause["pause_id"])["receipt"] for pause in (answered, timed_out, other)}
    with LiveServer(api.app, api.config) as server:
        check = readme_receipt_check(server.url)
        check(receipt[answered["pause_id"]], answered["pause_id"])
        assert checked(api, receipt[timed_out["pause_id"]])["choice"] == "Approve"      # the default, no one's answer
        with pytest.raises(AssertionError):
            check(receipt[timed_out["pause_id"]], timed_out["pause_id"])
        with pytest.raises(AssertionError):
            check(receipt[other["pause_id"]], answered["pause_id"])        # another pause's receipt
        with pytest.raises(jwt.InvalidSignatureError):
            check(forged(receipt[timed_out["pause_id"]], status="responded"), timed_out["pause_id"])


def test_verify_audit_names_each_decided_pause_changed_behind_the_servers_back(api):
    key = api.register()["api_key"]
    created = [api.create_pause(key, channel="link", recipient="ops") for _ in range(5)]
    for pause, comment in zip(created, ("only for staging", None, None, None, None)):
        api.post_json(f"/v1/respond/{token_of(pause['respond_url'])}", {"choice": "Approve", "comment": comment})
    team = api.post_json("/v1/pause", TEAM, headers=api.as_key(key)).json
    for person in team["recipients"]:
        api.post_json(f"/v1/respond/{token_of(person['respond_url'])}", {"choice": "Approve", "comment": "fine"})
    assert verify_audit(api.config) == (0, "every audit chain holds: 14 events in 1 chain\n"
                                           "every receipt checks: 6 decided pauses say what their receipts do\n")
    commented, rechosen, swapped, other, forged_one = (pause["pause_id"] for pause in created)
    stored(api.config, "UPDATE pauses SET comment = NULL WHERE id = ?", commented)
    stored(api.config, "UPDATE pauses SET choice = 'Reject' WHERE id = ?", rechosen)
    stored(api.config, "UPDATE pauses SET receipt = (SELECT receipt FROM pauses WHERE id = ?) WHERE id = ?",
           other, swapped)
    stored(api.config, "UPDATE pauses SET receipt = ? WHERE id = ?",
           forged(api.pause(key, forged_one)["receipt"], choice="Reject"), forged_one)
    stored(api.config, "UPDATE pause_recipients SET comment = 'no' WHERE pause_id = ? AND recipient = 'bo'",
           team["pause_id"])
    broken, unsigned = (api.create_pause(key, channel="link", recipient="ops")["pause_id"] for _ in range(2))
    for pause_id in (broken, unsigned):
        api.post(f"/v1/pause/{pause_id}/cancel", headers=api.as_key(key))
    stored(api.config, "UPDATE pauses SET options = '[\"Approve\"' WHERE id = ?", broken)
    stored(api.config, "UPDATE pauses SET receipt = NULL, status = 'responded', choice = 'Approve' WHERE id = ?",
           unsigned)
    status, said = verify_audit(api.config)
    assert status == 1 and said.splitlines()[0] == "every audit chain holds: 18 events in 1 chain"
    named = {line.split(" ")[0]: line for line in said.splitlines()[1:]}
    assert set(named) == {commented, rechosen, swapped, forged_one, team["pause_id"], broken, unsigned}
    assert "holds what this server never writes" in named[broken] and "its receipt was removed" in named[unsigned]
    assert "(comment_sha256)" in named[commented] and "(choice)" in named[rechosen] and "(pause_id)" in named[swapped]
    assert "signature does not check" in named[forged_one] and "(votes)" in named[team["pause_id"]]


def test_verify_audit_names_no_pause_decided_before_receipts_for_having_none(tmp_path):
    """A database from before receipts: its pauses decided then have none by right."""
    from test_database import make_database
    old = str(tmp_path / "pausepoint.db")
    db = make_database(old, "schema_v10.sql", 10)
    rows = {"developers": {"id": "dev_1", "email": "a@example.com", "name": "A", "password_hash": "x",
                           "created_at": "2026-01-01T00:00:00.000Z"},
            "pauses": {"id": "psr_1", "developer_id": "dev_1", "livemode": 1, "recipient": "ops", "channel": "link",
                       "message": "Old?", "options": '["Yes","No"]', "respond_token": "tok", "status": "responded",
                       "choice": "Yes", "decided_by": "respondent", "created_at": "2026-01-01T00:00:00.000Z",
                       "expires_at": "2026-01-02T00:00:00.000Z", "decided_at": "2026-01-01T00:01:00.000Z"}}
    for table, row in rows.items():
        db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    db.commit()
    db.close()
    config = pausepoint.load_config(environ={}, overrides={"database.path": old})
    pausepoint.create_app(config).runtime.stop()            # upgraded, and its keys made, as a start does
    assert verify_audit(config) == (0, "every audit chain holds: 0 events in 0 chains\n"
                                       "every receipt checks: 0 decided pauses say what their receipts do\n")


def test_verify_audit_counts_one_chain_and_one_pause_in_the_singular(running_api):
    api = running_api()
    key = api.register()["test_api_key"]
    api.post_json(f"/v1/respond/{token_of(api.create_pause(key)['respond_url'])}", {"choice": "Approve"})
    api.app.runtime.stop()
    assert verify_audit(api.config) == (0, "every audit chain holds: 2 events in 1 chain\n"
                                           "every receipt checks: 1 decided pause says what its receipt does\n")


def test_verify_audit_says_which_receipts_it_could_not_check(running_api, capsys):
    api = running_api()
    key = api.register()["test_api_key"]
    api.post_json(f"/v1/respond/{token_of(api.create_pause(key)['respond_url'])}", {"choice": "Approve"})
    api.app.runtime.stop()
    keys = pausepoint.signing_keys_path(api.config["database.path"])
    os.rename(keys, keys + ".gone")
    # Gone, not unreadable: running it as the server's user would find no more.
    assert verify_audit(api.config) == (0, "every audit chain holds: 2 events in 1 chain\nreceipts not checked:"
                                           f" there is no {keys} (a server makes it at its first start; put one"
                                           " lost back from the latest backup, beside which `backup` copies it)\n")
    with open(keys, "w", encoding="utf-8") as f:
        f.write("{")        # there, and cut short
    assert verify_audit(api.config) == (0, "every audit chain holds: 2 events in 1 chain\nreceipts not checked:"
                                           f" {keys} cannot be read (run this as the server's user, or keep the"
                                           " keys file beside a copy)\n")
    os.remove(keys)
    assert pausepoint.main(["--db", api.config["database.path"], "rotate-signing-key", "--keys-lost"]) == 0
    status, said = verify_audit(api.config)
    assert status == 0 and said.endswith("every receipt checks: 0 decided pauses say what their receipts do\n1 receipt"
                                         " was signed with a key the keys file no longer holds (lost: see"
                                         " --keys-lost), and cannot be checked\n")


def test_verify_audit_names_a_decision_undone_or_made_again_behind_the_servers_back(api):
    """The audit chain records each decision: a pause put back to pending, then decided
    otherwise with a receipt of its own, or one whose receipt went with its decided_at moved
    to before receipts, no longer agrees with it."""
    key = api.register()["api_key"]
    reopened, backdated, never = (api.create_pause(key, channel="link", recipient="ops") for _ in range(3))
    for pause in (reopened, backdated):
        api.post_json(f"/v1/respond/{token_of(pause['respond_url'])}", {"choice": "Approve"})
    stored(api.config, "UPDATE pauses SET status = 'responded', choice = 'Approve', decided_by = 'recipient:ops',"
                       " decided_at = '2020-01-01T00:00:00.000Z' WHERE id = ?", never["pause_id"])
    stored(api.config, "UPDATE pauses SET status = 'pending', choice = NULL, decided_at = NULL, decided_by = NULL,"
                       " receipt = NULL WHERE id = ?", reopened["pause_id"])
    stored(api.config, "UPDATE pauses SET receipt = NULL, choice = 'Reject', decided_at = '2020-01-01T00:00:00.000Z'"
                       " WHERE id = ?", backdated["pause_id"])
    status, said = verify_audit(api.config)
    named = {line.split(" ")[0]: line for line in said.splitlines()[1:]}
    assert status == 1 and set(named) == {reopened["pause_id"], backdated["pause_id"], never["pause_id"]}
    assert f"{reopened['pause_id']} (" in said and "it is pending, though aud_" in said
    assert "it is responded, though the audit log records its creation (aud_" in named[never["pause_id"]]
    assert f"{backdated['pause_id']} (" in said and "its receipt was removed" in said and "(choice)" in said
    api.post_json(f"/v1/respond/{token_of(reopened['respond_url'])}", {"choice": "Reject"})
    assert api.pause(key, reopened["pause_id"])["choice"] == "Reject"
    status, said = verify_audit(api.config)
    named = {line.split(" ")[0]: line for line in said.splitlines()[1:]}
    assert status == 1 and "the audit log records 2 decisions of it" in named[reopened["pause_id"]]
