"""Metrics: request instruments, the scrape-time stats collector, bounded labels, the HTTP endpoint, hot keys."""

from __future__ import annotations

import asyncio
import gzip
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtierd.hotkeys import BUCKETS, HotKeys
from kvtierd.metrics import LATENCY_BUCKETS, Metrics

ALLOWED_LABELS = {"tier", "op", "namespace", "reason", "code", "src", "dst", "kind", "result", "generation", "domain",
                  "le"}


def full_stats() -> dict:
    tier = lambda cap, used, blocks, hits, misses, served: {  # noqa: E731
        "capacity_bytes": cap, "used_bytes": used, "blocks": blocks, "hits": hits, "misses": misses,
        "served_blocks": served}
    return {
        "tiers": {"host": tier(1 << 30, 1 << 20, 64, 100, 20, 90),
                  "disk": {**tier(8 << 30, 4 << 20, 256, 30, 5, 30), "io_errors": 99},
                  "hbm": tier(0, 0, 0, 0, 0, 0)},
        "moves": [{"src": "host", "dst": "disk", "kind": "demote", "blocks": 10, "bytes": 10 << 16},
                  {"src": "host", "dst": "disk", "kind": "flush", "blocks": 3, "bytes": 3 << 16},
                  {"src": "disk", "dst": "host", "kind": "promote", "blocks": 4, "bytes": 4 << 16}],
        "evictions": {"host": 0, "disk": 7},
        "domains": {"default": {"capacity_bytes": 1 << 30, "huge_bytes": 0, "populated_bytes": 256 << 20},
                    "batch": {"capacity_bytes": 1 << 28, "huge_bytes": 1 << 28, "populated_bytes": 1 << 28}},
        "namespaces": [{"name": "llama", "block_size": 65536, "blocks": 300, "hits": 120, "misses": 25,
                        "tokens_per_block": 16, "tokens_served": 1920, "bytes_served": 7 << 16,
                        "bytes_stored": 9 << 16, "acquire_misses": 2}],
        "clients": 3, "busy_poll_seconds": 0.5, "leases": 5, "reservations": 2, "lease_timeouts": 1,
        "reservation_timeouts": 1,
        "quarantined_slots": 2, "corrupt_blocks": 1, "full_keys": 3, "bad_frees": 0,
        "disk": {"checksum_failures": 2, "torn_records": 1, "corrupt_records": 0, "recovery_seconds": 0.25,
                 "compaction_runs": 4, "compaction_bytes": 1 << 20, "io_errors": 6, "direct_io": True,
                 "refusing_writes": False, "read_bytes": 5 << 20, "written_bytes": 9 << 20, "segments": 3,
                 "live_bytes": 3 << 20, "hints_written": 2, "hint_errors": 0, "maintenance_errors": 1,
                 "stray_files": 1},
        "errors": {"bad_key": 3, "unknown_namespace": 1},
    }


def scrape(m: Metrics) -> dict[tuple[str, tuple], float]:
    body, _ = m.render()
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_store_stats_become_metrics_with_the_documented_names():
    m = Metrics(lambda: full_stats(), process_metrics=False)
    v = scrape(m)
    assert v[("kvtierd_tier_capacity_bytes", (("tier", "host"),))] == 1 << 30
    assert v[("kvtierd_tier_used_bytes", (("tier", "disk"),))] == 4 << 20
    assert v[("kvtierd_tier_blocks", (("tier", "host"),))] == 64
    assert v[("kvtierd_lookup_keys_total", (("result", "hit"), ("tier", "host")))] == 100
    assert v[("kvtierd_lookup_keys_total", (("result", "miss"), ("tier", "disk")))] == 5
    assert v[("kvtierd_blocks_served_total", (("tier", "disk"),))] == 30
    assert v[("kvtierd_namespace_block_bytes_total", (("kind", "stored"), ("namespace", "llama")))] == 9 << 16
    assert v[("kvtierd_namespace_acquire_misses_total", (("namespace", "llama"),))] == 2
    assert v[("kvtierd_quarantined_slots", ())] == 2
    assert v[("kvtierd_host_corrupt_blocks_total", ())] == 1
    assert v[("kvtierd_host_populated_bytes", (("domain", "default"),))] == 256 << 20
    assert v[("kvtierd_host_huge_bytes", (("domain", "batch"),))] == 1 << 28
    assert v[("kvtierd_block_moves_total", (("dst", "disk"), ("kind", "demote"), ("src", "host")))] == 10
    assert v[("kvtierd_block_moves_total", (("dst", "host"), ("kind", "promote"), ("src", "disk")))] == 4
    # bytes are summed over kinds for one src->dst pair
    assert v[("kvtierd_moved_bytes_total", (("dst", "disk"), ("src", "host")))] == 13 << 16
    assert v[("kvtierd_evictions_total", (("tier", "disk"),))] == 7
    assert v[("kvtierd_clients_connected", ())] == 3
    assert v[("kvtierd_leases_outstanding", ())] == 5
    assert v[("kvtierd_reservations_outstanding", ())] == 2
    assert v[("kvtierd_lease_timeouts_total", ())] == 1
    assert v[("kvtierd_disk_checksum_failures_total", ())] == 2
    assert v[("kvtierd_disk_torn_records_total", ())] == 1
    assert v[("kvtierd_disk_recovery_seconds", ())] == 0.25
    assert v[("kvtierd_disk_compaction_runs_total", ())] == 4
    assert v[("kvtierd_disk_compacted_bytes_total", ())] == 1 << 20
    assert v[("kvtierd_disk_io_errors_total", ())] == 6          # top-level disk wins over tiers.disk
    assert v[("kvtierd_disk_direct_io", ())] == 1
    assert v[("kvtierd_disk_refusing_writes", ())] == 0
    assert v[("kvtierd_disk_read_bytes_total", ())] == 5 << 20
    assert v[("kvtierd_disk_written_bytes_total", ())] == 9 << 20
    assert v[("kvtierd_disk_live_bytes", ())] == 3 << 20
    assert v[("kvtierd_disk_segments", ())] == 3
    assert v[("kvtierd_tokens_served_total", (("namespace", "llama"),))] == 1920
    assert v[("kvtierd_namespace_lookup_keys_total", (("namespace", "llama"), ("result", "miss")))] == 25
    assert v[("kvtierd_namespace_block_size_bytes", (("namespace", "llama"),))] == 65536
    assert v[("kvtierd_errors_total", (("reason", "bad_key"),))] == 3
    assert v[("kvtierd_stats_failures_total", ())] == 0


def test_every_metric_follows_naming_and_label_rules():
    m = Metrics(lambda: full_stats(), process_metrics=False)
    m.observe_request("lookup", "ok", 1e-4)
    body, _ = m.render()
    fams = list(text_string_to_metric_families(body.decode()))
    assert len(fams) > 25
    for fam in fams:
        assert fam.name.startswith("kvtierd_"), fam.name
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)
            if fam.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), s.name
        for unit in ("bytes", "seconds"):
            # the unit is the last word of the name (before _total)
            if unit in fam.name and not fam.name.endswith("_created"):
                assert fam.name.endswith("_" + unit), fam.name


@pytest.mark.parametrize("stats", [
    {}, {"tiers": None}, {"tiers": {"host": {}}}, {"tiers": {"host": {"used_bytes": "lots"}}},
    {"moves": [None, {"src": "host"}, {"src": "host", "dst": "disk", "blocks": "x"}]},
    {"namespaces": [{"blocks": 3}, "junk"]}, {"disk": None, "errors": {"x": None, 5: 1}},
    {"evictions": [1, 2]}, {"clients": None},
])
def test_missing_or_malformed_stats_never_break_the_scrape(stats):
    m = Metrics(lambda: stats, process_metrics=False)
    m.observe_request("store", "ok", 0.001)
    v = scrape(m)
    assert v[("kvtierd_requests_total", (("code", "ok"), ("op", "store")))] == 1
    assert v[("kvtierd_stats_failures_total", ())] == 0


def test_store_wide_misses_are_counted_under_tier_none():
    m = Metrics(lambda: {"tiers": {"host": {"hits": 8}}, "misses": 2}, process_metrics=False)
    v = scrape(m)
    assert v[("kvtierd_lookup_keys_total", (("result", "miss"), ("tier", "none")))] == 2
    assert v[("kvtierd_lookup_keys_total", (("result", "hit"), ("tier", "host")))] == 8


def test_a_failing_stats_fn_is_counted_and_request_metrics_still_scrape():
    def boom():
        raise RuntimeError("store gone")
    m = Metrics(boom, process_metrics=False)
    m.observe_request("lookup", "ok", 0.002)
    v = scrape(m)
    assert v[("kvtierd_stats_failures_total", ())] == 1
    assert v[("kvtierd_request_duration_seconds_count", (("op", "lookup"),))] == 1
    assert not any(k[0].startswith("kvtierd_tier_") for k in v)


def test_latency_histogram_spans_10us_to_10s_and_buckets_correctly():
    assert LATENCY_BUCKETS[0] == pytest.approx(1e-5) and LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    m = Metrics(None, process_metrics=False)
    for s in (2e-5, 3e-5, 0.2, 20.0):
        m.observe_request("acquire", "ok", s)
    m.observe_request("acquire", "not_found", 1e-3)
    v = scrape(m)
    bucket = lambda le: v[("kvtierd_request_duration_seconds_bucket", (("le", le), ("op", "acquire")))]  # noqa: E731
    assert bucket("2.5e-05") == 1
    assert bucket("5e-05") == 2
    assert bucket("0.25") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert v[("kvtierd_requests_total", (("code", "ok"), ("op", "acquire")))] == 4
    assert v[("kvtierd_requests_total", (("code", "not_found"), ("op", "acquire")))] == 1


def test_namespace_labels_are_bounded_sticky_and_the_rest_summed_as_other():
    names = ["a", "b", "c", "d"]
    current = {"namespaces": [{"name": n, "blocks": 1, "hits": 10, "misses": 1, "tokens_served": 5, "block_size": 4096}
                              for n in names]}
    m = Metrics(lambda: current, max_namespaces=2, process_metrics=False)
    v = scrape(m)
    labelled = {dict(k[1])["namespace"] for k in v if k[0] == "kvtierd_tokens_served_total"}
    assert labelled == {"a", "b", "other"}
    assert v[("kvtierd_tokens_served_total", (("namespace", "other"),))] == 10
    assert ("kvtierd_namespace_block_size_bytes", (("namespace", "other"),)) not in v
    # "a" disappears, "e" appears: the two admitted names keep their series, newcomers stay in "other"
    current["namespaces"] = current["namespaces"][1:] + [{"name": "e", "tokens_served": 7}]
    v = scrape(m)
    labelled = {dict(k[1])["namespace"] for k in v if k[0] == "kvtierd_tokens_served_total"}
    assert labelled == {"b", "other"}
    assert v[("kvtierd_tokens_served_total", (("namespace", "other"),))] == 17


def test_an_enum_op_is_labelled_by_its_name_not_its_number():
    import enum

    class Op(enum.IntEnum):
        LOOKUP = 4

    m = Metrics(None, process_metrics=False)
    m.observe_request(Op.LOOKUP, "ok", 1e-4)
    m.observe_request(Op.LOOKUP, "ok", 1e-4)
    assert scrape(m)[("kvtierd_requests_total", (("code", "ok"), ("op", "lookup")))] == 2


def test_registry_is_private_to_each_metrics_object():
    a, b = Metrics(None, process_metrics=False), Metrics(None, process_metrics=False)
    a.observe_request("lookup", "ok", 0.001)
    assert ("kvtierd_requests_total", (("code", "ok"), ("op", "lookup"))) not in scrape(b)


async def _http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_http_endpoint_serves_metrics_on_an_ephemeral_port_and_reads_stats_on_the_loop_thread():
    seen_threads = []

    def stats():
        seen_threads.append(threading.get_ident())
        return full_stats()

    async def main():
        m = Metrics(stats)
        port = await m.start_http("127.0.0.1:0")
        assert port > 0
        m.observe_request("lookup", "ok", 0.0001)
        try:
            code, hdrs, body = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert code == 200 and hdrs["content-type"].startswith("text/plain")
            text = body.decode()
            assert 'kvtierd_requests_total{code="ok",op="lookup"} 1.0' in text
            assert 'kvtierd_tier_blocks{tier="host"} 64.0' in text
            assert "process_resident_memory_bytes" in text

            code, hdrs, body = await _http(port, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
            assert code == 200 and hdrs["content-encoding"] == "gzip"
            assert b"kvtierd_tier_blocks" in gzip.decompress(body)

            code, hdrs, body = await _http(
                port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n")
            assert "openmetrics" in hdrs["content-type"] and body.rstrip().endswith(b"# EOF")

            assert (await _http(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
            assert (await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await _http(port, b"garbage\r\n\r\n"))[0] == 400
        finally:
            await m.stop_http()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert seen_threads and all(t == loop_thread for t in seen_threads)


def test_http_endpoint_reports_a_busy_port_clearly():
    async def main():
        a, b = Metrics(None, process_metrics=False), Metrics(None, process_metrics=False)
        port = await a.start_http("127.0.0.1:0")
        try:
            with pytest.raises(OSError, match=f"cannot listen for metrics on 127.0.0.1:{port}"):
                await b.start_http(f"127.0.0.1:{port}")
        finally:
            await a.stop_http()
    asyncio.run(main())


# ------------------------------------------------------------------ hot keys

class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_hot_keys_rank_the_most_read_keys_per_namespace():
    hk = HotKeys(top_n=2, window_s=60, clock=FakeClock())
    hk.record("ns1", [b"\x01", b"\x02", b"\x01", b"\x03"])
    hk.record("ns1", [b"\x01", b"\x02"])
    hk.record("ns2", [b"\xff"])
    assert hk.top("ns1") == {"ns1": [("01", 3), ("02", 2)]}
    assert hk.top() == {"ns1": [("01", 3), ("02", 2)], "ns2": [("ff", 1)]}
    assert hk.top("missing") == {}


def test_hot_keys_forget_reads_that_slid_out_of_the_window():
    clock = FakeClock()
    hk = HotKeys(top_n=3, window_s=60, clock=clock)
    hk.record("ns", [b"old"] * 5)
    clock.t += 30
    hk.record("ns", [b"new"] * 2)
    assert dict(hk.top("ns")["ns"]) == {b"old".hex(): 5, b"new".hex(): 2}
    clock.t += 35                     # 65 s after "old": past the window, "new" is 35 s old
    assert dict(hk.top("ns")["ns"]) == {b"new".hex(): 2}
    clock.t += 60
    assert hk.top() == {}


def test_hot_keys_memory_stays_bounded_and_heavy_hitters_survive():
    hk = HotKeys(top_n=4, window_s=60, clock=FakeClock())
    heavy = [bytes([0xAA, i]) for i in range(4)]
    for batch in range(200):
        cold = [batch.to_bytes(2, "big") + i.to_bytes(2, "big") for i in range(50)]   # 10 000 distinct keys
        hk.record("ns", cold + heavy * 3)
    counts = hk._ns["ns"].buckets[-1][1]
    assert len(counts) <= 2 * hk._capacity
    top = hk.top("ns")["ns"]
    assert {k for k, _ in top} == {h.hex() for h in heavy}
    for _, n in top:
        # Misra-Gries: a lower bound, off by at most reads / (capacity + 1)
        assert 600 - 10_600 / (hk._capacity + 1) <= n <= 600


def test_hot_keys_reconfigure_changes_top_n_and_a_new_window_starts_afresh():
    hk = HotKeys(top_n=1, window_s=60, clock=FakeClock())
    hk.record("ns", [b"a", b"a", b"b"])
    assert hk.top("ns") == {"ns": [("61", 2)]}
    hk.configure(top_n=5, window_s=60)
    assert hk.top("ns") == {"ns": [("61", 2), ("62", 1)]}
    hk.configure(top_n=5, window_s=120)
    assert hk.top() == {}
    hk.configure(top_n=0, window_s=120)
    hk.record("ns", [b"a"])
    assert hk.top() == {}
    with pytest.raises(ValueError):
        hk.configure(top_n=5, window_s=0)
    assert BUCKETS >= 4


def test_grafana_dashboard_and_operating_doc_name_only_metrics_that_exist():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    stats = full_stats()
    stats["misses"] = 4
    stats["disk"].update(reads=1, writes=1, refused_writes=0)
    from kvtierd.config import load
    from kvtierd.remote import RemoteTier
    stats["remote"] = RemoteTier(load(overrides={"remote.url": "redis://127.0.0.1:1"}).remote).stats()
    m = Metrics(lambda: stats, process_metrics=False)
    m.observe_request("lookup", "ok", 1e-4)
    exported = set()
    for fam in text_string_to_metric_families(m.render()[0].decode()):
        exported |= {s.name for s in fam.samples}
    dash = json.loads((root / "configs/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    used = {n for e in exprs for n in re.findall(r"\bkvtierd_[a-z_]+", e)}
    doc = (root / "README.md").read_text()
    used |= set(re.findall(r"\bkvtierd_[a-z_]+_(?:total|bytes|seconds|bucket|connected|outstanding|blocks|io|writes|"
                           r"segments)\b", doc))
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported if not n.endswith("_created")}
    missing = sorted(n for n in used if n not in exported and n not in families)
    assert not missing, missing
    # and every exported family is documented
    undocumented = sorted(f for f in families if f not in doc)
    assert not undocumented, undocumented


def test_garbage_collection_pauses_are_a_histogram_by_generation():
    import gc
    m = Metrics(None)
    try:
        before = scrape(m).get(("kvtierd_gc_pause_seconds_count", (("generation", "2"),)), 0)
        gc.collect(2)
        gc.collect(2)
        v = scrape(m)
        assert v[("kvtierd_gc_pause_seconds_count", (("generation", "2"),))] >= before + 2
        assert v[("kvtierd_gc_pause_seconds_sum", (("generation", "2"),))] > 0
        assert ("kvtierd_gc_pause_seconds_bucket", (("generation", "0"), ("le", "+Inf"))) in v
    finally:
        m.gc_pauses.close()
    assert m.gc_pauses._callback not in gc.callbacks
