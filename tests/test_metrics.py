"""Prometheus metrics for operators, read with Prometheus's own parser."""

import socket
import threading
import time

import pytest
import requests

from conftest import WIRE, free_port, register_over_http, scraped, stored, token_of, value
import pausepoint


def test_metrics_are_off_unless_enabled(api):
    assert api.get("/metrics", status=404)


def test_the_figures_move_as_pauses_are_created_and_decided(running_api, receiver):
    api = running_api(**{"metrics.enabled": True, "metrics.listen": "", "webhooks.allow_private": True})
    key = api.register()["test_api_key"]
    api.post_json("/v1/webhooks", {"url": receiver.url, "events": ["pause.responded"]}, headers=api.as_key(key))
    before = scraped(api.get("/metrics").text)
    assert value(before, "pausepoint_pauses_pending", mode="test") == 0
    answered, expired, pending = (api.create_pause(key) for _ in range(3))
    api.post_json(f"/v1/respond/{token_of(answered['respond_url'])}", {"choice": "Approve"})
    stored(api.config, "UPDATE pauses SET expires_at = ? WHERE id = ?",
           pausepoint.db_time(pausepoint.utcnow() - pausepoint.dt.timedelta(seconds=3)), expired["pause_id"])
    middle = scraped(api.get("/metrics").text)
    assert value(middle, "pausepoint_outbox_depth", outbox="notifications", mode="test") == 2     # the answered one's cancelled
    assert value(middle, "pausepoint_outbox_depth", outbox="webhooks", mode="test") == 1
    # What a free account does with its test key never shows as the live figures operators alert on.
    assert [value(middle, name, outbox=outbox, mode="live") for name in ("pausepoint_outbox_depth",
            "pausepoint_outbox_oldest_due_seconds") for outbox in ("notifications", "webhooks")] == [0, 0, 0, 0]
    assert (middle[("pausepoint_pauses_pending", frozenset({("mode", "live")}))],
            value(middle, "pausepoint_pauses_pending", mode="test")) == (0, 2)
    stored(api.config, "UPDATE notifications SET next_attempt_at = ? WHERE pause_id = ?",
           pausepoint.db_time(pausepoint.utcnow() - pausepoint.dt.timedelta(seconds=100)), pending["pause_id"])
    assert 100 <= value(scraped(api.get("/metrics").text), "pausepoint_outbox_oldest_due_seconds",
                        outbox="notifications", mode="test") < 200
    api.step("timeouts")
    api.step("notifications")
    api.step("webhooks")
    after = scraped(api.get("/metrics").text)
    assert value(after, "pausepoint_pauses_created_total", mode="test") == 3
    assert value(after, "pausepoint_pauses_decided_total", outcome="responded", mode="test") == 1
    assert value(after, "pausepoint_pauses_decided_total", outcome="timed_out", mode="test") == 1
    assert value(after, "pausepoint_pauses_pending", mode="test") == 1
    assert value(after, "pausepoint_decision_seconds_count", mode="test") == 1
    assert value(after, "pausepoint_timeout_lateness_seconds_count") == 1
    assert 3 <= value(after, "pausepoint_timeout_lateness_seconds_sum") < 60
    # The decided pauses' unsent texts were cancelled; the pending one's was simulated.
    assert value(after, "pausepoint_notification_attempts_total", channel="sms", result="simulated") == 1
    assert value(after, "pausepoint_webhook_attempts_total", result="succeeded", mode="test") == 1
    assert value(after, "pausepoint_webhook_attempts_total", result="succeeded", mode="live") == 0
    assert value(after, "pausepoint_outbox_depth", outbox="notifications", mode="test") == 0
    assert value(after, "pausepoint_request_seconds_count", method="POST", route="/v1/pause") == 3
    assert pending["status"] == "pending"


def test_a_rolled_back_change_is_never_counted_and_refusals_are(running_api):
    api = running_api(**{"metrics.enabled": True, "metrics.listen": "",
                                     "ratelimit.test_pauses_per_hour": 1})
    key = api.register()["test_api_key"]
    api.create_pause(key)
    api.post_json("/v1/pause", WIRE, headers=api.as_key(key), status=429)
    samples = scraped(api.get("/metrics").text)
    assert value(samples, "pausepoint_pauses_created_total", mode="test") == 1
    assert value(samples, "pausepoint_rate_limit_refusals_total", limit="test_pauses") == 1


def test_a_long_poll_is_timed_once_for_its_whole_wait(metered_server):
    """A long poll gives its thread back while it waits and is served again when its time
    runs out: one request, not one per time it was served, and timed from its start."""
    url = metered_server.url
    headers = {"Authorization": f"Bearer {register_over_http(url)['test_api_key']}"}
    pause = requests.post(f"{url}/v1/pause", json=WIRE, headers=headers, timeout=10).json()
    waited = requests.get(f"{url}/v1/pause/{pause['pause_id']}?wait=1", headers=headers, timeout=10)
    assert waited.json()["status"] == "pending"
    samples = scraped(requests.get(f"{url}/metrics", timeout=10).text)
    route = {"method": "GET", "route": "/v1/pause/<pause_id>"}
    assert value(samples, "pausepoint_request_seconds_count", **route) == 1
    assert 1 <= value(samples, "pausepoint_request_seconds_sum", **route) < 10


def test_metrics_can_be_served_on_an_address_of_their_own(running_api):
    port = free_port()
    api = running_api(jobs=True, **{"metrics.enabled": True, "metrics.listen": f"127.0.0.1:{port}"})
    api.create_pause(api.register()["test_api_key"])
    samples = scraped(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    assert value(samples, "pausepoint_pauses_created_total", mode="test") == 1
    api.get("/metrics", status=404)             # not on the API's address


def test_connections_left_silent_on_the_metrics_address_take_a_few_threads_not_one_each(running_api):
    """Whoever reaches the metrics' address cannot spend the process's threads and descriptors."""
    port = free_port()
    running_api(jobs=True, **{"metrics.enabled": True, "metrics.listen": f"127.0.0.1:{port}"})
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    try:
        # Accepted in turn: the first few are served (and wait to be sent a request), the rest closed.
        for connection in silent[pausepoint.METRICS_CONNECTIONS:]:
            assert connection.recv(1) == b""
        serving = [thread for thread in threading.enumerate() if "process_request" in thread.name]
        assert len(serving) <= pausepoint.METRICS_CONNECTIONS
    finally:
        for connection in silent:
            connection.close()


def test_a_connection_trickling_its_request_to_the_metrics_address_is_cut_at_its_time(running_api, monkeypatch):
    """Each byte in time for a read's timeout, so only a time for the whole connection ends it."""
    monkeypatch.setattr(pausepoint, "METRICS_CLIENT_SECONDS", 1)
    port = free_port()
    running_api(jobs=True, **{"metrics.enabled": True, "metrics.listen": f"127.0.0.1:{port}"})
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as trickling:
        trickling.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        with pytest.raises(OSError):
            while time.monotonic() - started < 10:
                trickling.sendall(b"x")
                time.sleep(0.2)
    assert time.monotonic() - started < 5


def test_a_metrics_address_that_is_not_host_and_port_stops_start_up_with_a_sentence(tmp_path):
    from conftest import make_config
    with pytest.raises(pausepoint.ConfigError, match="metrics.listen must be host:port"):
        pausepoint.create_app(make_config(tmp_path, **{"metrics.enabled": True, "metrics.listen": "9464"}))
