import hashlib
import re
import sqlite3
import sys
import threading

import pytest

from conftest import PASSWORD, WIRE, Api, make_config, wait_until
import pausepoint


def test_registration_returns_exactly_the_quickstarts_fields(api):
    body = api.post_json("/v1/auth/register", {"email": "you@example.com", "name": "Your Name",
                                               "password": "your-password"}, status=201).json
    assert set(body) == {"developer_id", "api_key", "test_api_key", "plan", "message"}
    assert re.fullmatch(r"pp_live_[A-Za-z0-9]{48}", body["api_key"])
    assert re.fullmatch(r"pp_test_[A-Za-z0-9]{48}", body["test_api_key"])
    assert body["plan"] == "free"
    assert "not be shown again" in body["message"]


def test_only_digests_of_keys_and_a_bcrypt_hash_of_the_password_are_stored(api, developer, config):
    raw = b"".join(open(config["database.path"] + suffix, "rb").read() for suffix in ("", "-wal"))
    db = sqlite3.connect(config["database.path"])
    stored = {row[0] for row in db.execute("SELECT key_hash FROM api_keys")}
    for key in (developer["api_key"], developer["test_api_key"]):
        assert key.encode() not in raw
        assert hashlib.sha256(key.encode()).hexdigest() in stored
    password_hash = db.execute("SELECT password_hash FROM developers").fetchone()[0]
    assert password_hash.startswith("$2b$") and PASSWORD not in password_hash


def test_a_name_as_long_as_the_sign_up_form_takes_is_fine(api):
    assert api.post_json("/v1/auth/register", {"email": "a@example.com", "name": "x" * 100, "password": PASSWORD},
                         status=201).json["plan"] == "free"


def test_a_duplicate_email_is_refused_with_409_whatever_its_case(api, developer):
    body = api.post_json("/v1/auth/register", {"email": "DEV@example.com", "name": "X", "password": PASSWORD},
                         status=409).json
    assert body["error"]["code"] == "email_taken"


@pytest.mark.parametrize("changes, field", [
    ({"email": "not-an-email"}, "email"),
    ({"email": None}, "email"),
    ({"name": "  "}, "name"),
    ({"name": "Acme\nBank"}, "name"),
    ({"name": "Acme\tBank"}, "name"),
    ({"name": "x" * 101}, "name"),
    ({"password": "short"}, "password"),
    ({"password": "x" * 73}, "password"),
])
def test_bad_registration_fields_get_422_naming_the_field(api, changes, field):
    body = {"email": "a@example.com", "name": "A", "password": PASSWORD, **changes}
    error = api.post_json("/v1/auth/register", body, status=422).json["error"]
    assert error["code"] == "invalid_request" and error["field"] == field


def test_closed_registration_says_how_the_operator_adds_developers(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"registration.open": False}))
    error = Api(app).post_json("/v1/auth/register", {"email": "a@example.com", "name": "A", "password": PASSWORD},
                               status=403).json["error"]
    assert error["code"] == "registration_closed"
    assert "create-developer" in error["message"]


def test_a_start_warns_when_the_dashboards_registration_switch_overrides_the_config(tmp_path, spawn_server):
    """registration.open = false in the config reads as closed; a switch flipped on the dashboard
    long ago may have it open, and that is a security setting: say so, which wins, and where to change it."""
    app = pausepoint.create_app(make_config(tmp_path))
    ops = pausepoint.register_developer(app.runtime.db(), app.runtime.config, "ops@example.com", "Ops", "password123")
    pausepoint.set_registration_open(app.runtime.db(), True, ops["developer_id"], "ops@example.com")
    app.runtime.stop()
    server = spawn_server(env={"PAUSEPOINT_REGISTRATION_OPEN": "false"})
    warned = [line for line in server.output().splitlines() if "registration.open" in line]
    assert len(warned) == 1 and "WARNING" in warned[0]
    assert "false in the config" in warned[0] and "operator:ops@example.com" in warned[0]
    assert "has registration open, and the switch wins: change it there (/dashboard/operator)" in warned[0]
    server.stop()
    agreeing = spawn_server(env={"PAUSEPOINT_REGISTRATION_OPEN": "true"})
    assert "registration.open" not in agreeing.output()


def test_registration_is_rate_limited_per_client_ip(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"ratelimit.register_per_hour": 2}))
    api = Api(app, extra_environ={"REMOTE_ADDR": "198.51.100.7"})
    for n in range(2):
        api.register(email=f"d{n}@example.com")
    refused = api.post_json("/v1/auth/register", {"email": "d9@example.com", "name": "A", "password": PASSWORD},
                            status=429)
    assert refused.json["error"]["code"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 1800
    other_ip = Api(app, extra_environ={"REMOTE_ADDR": "198.51.100.8"})
    other_ip.register(email="d10@example.com")


def test_an_ipv6_client_is_limited_by_its_slash_64_not_by_each_address_in_it(tmp_path):
    """Its holder may use any of the 2^64 addresses in it: counted apart, each would bring a
    budget of its own. An IPv4 address on a dual-stack listener counts as itself."""
    app = pausepoint.create_app(make_config(tmp_path, **{"ratelimit.register_per_hour": 2}))

    def register_from(address, n, status=201):
        return Api(app, extra_environ={"REMOTE_ADDR": address}).post_json(
            "/v1/auth/register", {"email": f"v{n}@example.com", "name": "V", "password": PASSWORD}, status=status)
    register_from("2001:db8:1:2::1", 1)
    register_from("2001:db8:1:2:ffff::9", 2)
    assert register_from("2001:db8:1:2:abcd::7", 3, status=429).json["error"]["code"] == "rate_limited"
    register_from("2001:db8:1:3::1", 4)                         # the next /64: another subscriber's
    register_from("::ffff:198.51.100.7", 5)
    register_from("198.51.100.7", 6)
    register_from("::ffff:198.51.100.7", 7, status=429)
    register_from("64:ff9b::c633:6408", 8)                      # 198.51.100.8 through NAT64: not one of the /64
    register_from("64:ff9b::c633:6409", 9)
    register_from("64:ff9b::c633:640a", 10)                     # a third IPv4 client, so not one budget of two


def test_rotating_a_key_returns_a_new_one_and_the_old_one_stops_at_once(api, developer):
    old = developer["api_key"]
    api.get("/v1/pause", headers=api.as_key(old), status=200)
    body = api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "live"}).json
    new = body["api_key"]
    assert re.fullmatch(r"pp_live_[A-Za-z0-9]{48}", new) and new != old
    assert api.get("/v1/pause", headers=api.as_key(old), status=401).json["error"]["code"] == "unauthorized"
    api.get("/v1/pause", headers=api.as_key(new), status=200)
    api.get("/v1/pause", headers=api.as_key(developer["test_api_key"]), status=200)
    events = api.get("/v1/audit", {"event_type": "key.rotated"}, headers=api.as_key(new)).json["events"]
    assert len(events) == 1 and events[0]["data"]["mode"] == "live"
    assert events[0]["data"]["revoked_key"].endswith(old[-4:])


def test_a_rotation_names_the_endpoints_the_old_key_pointed_which_go_on_receiving_events(api, developer):
    """Whoever held a leaked key may have pointed endpoints anywhere, and they keep receiving
    the links that answer pauses: a rotation names those whose URL the old key set last."""
    def rotate():
        return api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD,
                                                      "key": "live"}).json

    def made(key, name):
        return api.post_json("/v1/webhooks", {"url": f"https://hooks.example.com/{name}", "events": ["pause.created"]},
                             headers=api.as_key(key)).json["webhook_id"]

    first = developer["api_key"]
    kept, repointed, deleted = made(first, "kept"), made(first, "repointed"), made(first, "deleted")
    api.delete(f"/v1/webhooks/{deleted}", headers=api.as_key(first))
    test_mode = made(developer["test_api_key"], "test")
    rotated = rotate()
    assert rotated["endpoints_to_check"] == [{"webhook_id": kept, "url": "https://hooks.example.com/kept"},
                                             {"webhook_id": repointed, "url": "https://hooks.example.com/repointed"}]
    assert "It set the URL or secret of 2 webhook endpoints (endpoints_to_check)" in rotated["message"]
    second = rotated["api_key"]
    resecreted = made(second, "resecreted")
    api.patch_json(f"/v1/webhooks/{kept}", {"events": ["pause.responded"]}, headers=api.as_key(second))
    api.patch_json(f"/v1/webhooks/{repointed}", {"url": "https://elsewhere.example.com/"}, headers=api.as_key(second))
    third = rotate()["api_key"]
    api.patch_json(f"/v1/webhooks/{resecreted}", {"secret": "whsec_chosen_by_whoever_holds_it"},
                   headers=api.as_key(third))     # whoever knows the secret can sign events of their own
    again = rotate()
    assert again["endpoints_to_check"] == [{"webhook_id": resecreted, "url": "https://hooks.example.com/resecreted"}]
    assert test_mode not in str([rotated, again])
    events = api.get("/v1/audit", {"event_type": "key.rotated"}, headers=api.as_key(again["api_key"])).json["events"]
    assert [event["data"]["endpoints_it_set"] for event in events] == [[resecreted], [repointed, resecreted],
                                                                       [kept, repointed]]
    last = rotate()
    assert last["endpoints_to_check"] == [] and "webhook" not in last["message"]


def test_rotation_refuses_a_wrong_password_or_an_unknown_key_name(api, developer):
    api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": "wrong-password", "key": "live"},
                  status=401)
    api.post_json("/v1/auth/keys/rotate", {"email": "nobody@example.com", "password": PASSWORD, "key": "live"},
                  status=401)
    assert api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "prod"},
                         status=422).json["error"]["field"] == "key"
    api.get("/v1/pause", headers=api.as_key(developer["api_key"]), status=200)


def test_answers_holding_keys_secrets_or_respond_links_are_never_stored(api):
    registered = api.post_json("/v1/auth/register", {"email": "dev@example.com", "name": "Dev", "password": PASSWORD})
    rotated = api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "test"})
    key = rotated.json["test_api_key"]
    created = api.post_json("/v1/pause", WIRE, headers=api.as_key(key))
    read = api.get(f"/v1/pause/{created.json['pause_id']}", headers=api.as_key(key))
    listed = api.get("/v1/pause", headers=api.as_key(key))
    webhook = api.post_json("/v1/webhooks", {"url": "https://example.com/hook", "events": ["pause.responded"]},
                            headers=api.as_key(key))
    for answer in (registered, rotated, created, read, listed, webhook):
        assert answer.headers["Cache-Control"] == "no-store"


def test_refusals_are_never_stored_either(api, developer):
    key = api.as_key(developer["test_api_key"])
    refusals = (api.get("/v1/pause/psr_nothing", headers=key, status=404),
                api.post_json("/v1/pause", {}, headers=key, status=422),
                api.get("/v1/audit/export", {"since": "yesterday"}, headers=key, status=422),
                api.get("/v1/pause", status=401),
                api.get("/v1/no-such-endpoint", status=404),           # refused by Bottle, not a route
                api.delete("/v1/pause", status=405))
    for answer in refusals:
        assert answer.headers["Cache-Control"] == "no-store", answer.request.path


def test_rotation_is_rate_limited_per_client_ip(tmp_path):
    app = pausepoint.create_app(make_config(tmp_path, **{"ratelimit.rotate_per_hour": 3}))
    api = Api(app, extra_environ={"REMOTE_ADDR": "198.51.100.9"})
    api.register()
    for _ in range(3):
        api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": "guess-guess", "key": "live"},
                      status=401)
    refused = api.post_json("/v1/auth/keys/rotate", {"email": "dev@example.com", "password": PASSWORD, "key": "live"},
                            status=429)
    assert "Retry-After" in refused.headers


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer pp_live_" + "x" * 48])
def test_requests_without_a_valid_key_get_401_in_the_error_shape(api, header):
    headers = {"Authorization": header} if header else {}
    error = api.get("/v1/pause", headers=headers, status=401).json["error"]
    assert error["code"] == "unauthorized" and error["message"]


@pytest.mark.parametrize("key", ["sk_live_abc123", "whsec_abc123", '"pp_test_abc"'])
def test_a_key_of_another_shape_is_refused_saying_what_a_key_looks_like(api, key):
    error = api.get("/v1/pause", headers={"Authorization": f"Bearer {key}"}, status=401).json["error"]
    assert error["code"] == "unauthorized"
    assert "start with pp_live_ or pp_test_" in error["message"], error["message"]


def test_a_well_formed_key_this_server_never_issued_is_refused_as_not_its_own(api):
    error = api.get("/v1/pause", headers={"Authorization": "Bearer pp_live_your_key_here"}, status=401).json["error"]
    assert "not one this server issued" in error["message"], error["message"]


def test_password_checks_take_turns_by_address_so_a_flood_delays_another_by_one_check():
    turns, order = pausepoint.Turns(1), []

    def check(client, name):
        assert turns.take(client, timeout=10)
        order.append(name)
        turns.give()

    assert turns.take("198.51.100.7", timeout=0)           # the flood's first is hashing
    waiting = [("198.51.100.7", f"flood {n}") for n in range(5)] + [("192.0.2.1", "sign-in")]
    threads = [threading.Thread(target=check, args=who) for who in waiting]
    for n, thread in enumerate(threads, start=1):
        thread.start()
        wait_until(lambda: turns.waiting() == n)
    turns.give()
    for thread in threads:
        thread.join()
    assert order == ["flood 0", "sign-in", "flood 1", "flood 2", "flood 3", "flood 4"]
    # One that gives up is forgotten, and the turn it waited for is still there for the next.
    assert turns.take("198.51.100.7", timeout=0) and not turns.take("192.0.2.1", timeout=0.01)
    assert turns.waiting() == 0
    turns.give()
    assert turns.take("192.0.2.1", timeout=0)


def test_hashing_turns_given_up_and_handed_over_at_once_are_never_lost_or_doubled():
    turns, guard, holding, most = pausepoint.Turns(2), threading.Lock(), [0], [0]

    def ask(n):
        for i in range(300):                # waits that run out about as turns are handed over
            if turns.take(f"198.51.100.{(n + i) % 5}", timeout=(0, 0.0001, 0.001)[i % 3]):
                with guard:
                    holding[0] += 1
                    most[0] = max(most[0], holding[0])
                sum(range(1000))            # holding it a moment, while others come and go
                with guard:
                    holding[0] -= 1
                turns.give()

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(16)]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)             # threads switch between any two lines, races and all
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switching)
    assert most[0] <= 2 and turns.waiting() == 0
    assert [turns.take("192.0.2.1", timeout=0) for _ in range(3)] == [True, True, False]
    for _ in range(2):
        turns.give()
    with pytest.raises(RuntimeError):
        turns.give()                        # one more than were taken
