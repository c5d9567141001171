"""The remote tier's parts that need no server: value format, key names, breaker, budget, config."""

from __future__ import annotations

import os

import pytest
import xxhash
from redis.crc import key_slot

from kvtierd.config import ConfigError, load
from kvtierd.remote.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from kvtierd.remote.connection import client_options
from kvtierd.remote.values import FIXED_SIZE, NamespaceNames
from kvtierd.remote.writer import Budget, Write, WriteQueue


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_block_verifies_only_for_its_namespace_key_and_block_size():
    ns = NamespaceNames("llama/bf16/tenant-a")
    key, payload = os.urandom(32), os.urandom(4096)
    header = ns.header(key, payload)
    assert len(header) == FIXED_SIZE + 32
    assert ns.verify(key, 4096, header, payload) == xxhash.xxh3_64_intdigest(payload)
    assert ns.header(key, payload, xxhash.xxh3_64_intdigest(payload)) == header
    assert ns.verify(os.urandom(32), 4096, header, payload) is None                        # another key
    assert NamespaceNames("llama/bf16/tenant-b").verify(key, 4096, header, payload) is None  # another namespace
    assert ns.verify(key, 2048, header, payload) is None                                   # another block size
    assert ns.verify(key, 4096, header, payload[:-1]) is None                              # truncated
    assert ns.verify(key, 4096, None, payload) is None and ns.verify(key, 4096, header, None) is None
    for pos in (0, 4, 5, 8, 24, 32, FIXED_SIZE + 3):                                      # every header field
        bad = bytearray(header)
        bad[pos] ^= 0x40
        assert ns.verify(key, 4096, bytes(bad), payload) is None, pos
    bad = bytearray(payload)
    bad[1234] ^= 1
    assert ns.verify(key, 4096, header, bytes(bad)) is None                                # the payload
    assert key_slot(ns.key(key)) == key_slot(ns.header_key(key))                          # one node, one round


def test_remote_names_keep_namespaces_apart_and_spread_a_namespace_over_16_slots():
    a, b = NamespaceNames("a"), NamespaceNames("b")
    key = b"\x7b\x7d{}"                       # braces in a key do not break the hash tag (hex)
    assert a.key(key) != b.key(key)
    keys = [os.urandom(32) for _ in range(300)]
    slots = {key_slot(a.key(k)) for k in keys}
    assert len(slots) == 16                    # at most 16 MGETs per lookup, 16 slots of load
    assert len({s * 3 // 16384 for s in slots}) == 3     # 3 masters split the slots in thirds: all get some
    assert all(key_slot(a.key(k)) == key_slot(a.header_key(k)) for k in keys)
    one = NamespaceNames("a", buckets=1)
    assert len({key_slot(one.key(k)) for k in keys}) == 1
    per_block = NamespaceNames("a", buckets=0)
    assert len({key_slot(per_block.key(k)) for k in keys}) > 250
    for names in (a, one, per_block):           # the one-hash form a round uses names the same keys
        for k in keys[:20]:
            bucket, payload_key, header_key = names.redis_keys(k)
            assert (bucket, payload_key, header_key) == (names.bucket(k), names.key(k), names.header_key(k))


def test_breaker_opens_after_a_run_of_failures_and_closes_after_a_good_probe():
    clock = Clock()
    br = CircuitBreaker(failures=3, open_s=2.0, clock=clock)
    assert br.allow()
    br.failure(), br.failure()
    br.success()                                 # a good round ends the run
    assert not br.failure() and not br.failure() and br.allow()
    assert br.failure() and br.state == OPEN and not br.allow()
    assert not br.probe_due()
    clock.t += 2.0
    assert br.probe_due()
    br.probing()
    assert br.state == HALF_OPEN and not br.allow()
    br.probe_result(False)
    assert br.state == OPEN and not br.probe_due()
    clock.t += 2.0
    br.probing()
    br.probe_result(True)
    assert br.state == CLOSED and br.allow() and br.opens == 1


def test_budget_frees_bytes_when_their_ttl_ends_and_is_a_lifetime_cap_without_ttl():
    clock = Clock()
    b = Budget(limit=3000, ttl_s=10, clock=clock)
    b.spend(2000)
    assert b.room(1000, 0) and not b.room(1001, 0) and not b.room(1000, 1)
    clock.t += 11
    assert b.room(3000, 0) and b.used == 0
    cap = Budget(limit=3000, ttl_s=0, clock=clock)
    cap.spend(3000)
    clock.t += 1e6
    assert not cap.room(1, 0)


def test_write_queue_bounds_bytes_in_flight_and_rounds():
    q = WriteQueue(max_inflight_bytes=10_000, pipeline_bytes=5_000, budget=Budget(0, 0))
    ns = NamespaceNames("n")
    ws = [Write(ns, b"k%d" % i, memoryview(bytes(3000)), lambda ok: None) for i in range(4)]
    assert [q.admit(w) for w in ws] == [None, None, None, "full"]
    first = q.take()
    assert first == ws[:1]                       # 3000 + 3000 > pipeline_bytes
    assert q.inflight_bytes == 9000 and q.queued_bytes == 6000
    assert q.admit(ws[3]) == "full"              # taken but unfinished bytes still count
    q.finish(first[0], True)
    assert q.admit(ws[3]) is None


def test_remote_config_keys():
    cfg = load(overrides={"remote.url": "redis://127.0.0.1:7000"})
    assert cfg.remote.write_policy == "commit" and cfg.remote.url == "redis://127.0.0.1:7000"
    (host, port), opts = client_options(cfg.remote)
    assert (host, port) == ("127.0.0.1", 7000) and "ssl" not in opts
    tls = load(overrides={"remote.url": "rediss://u:secret@10.0.0.1:6380", "remote.tls_ca_file": "/ca.pem",
                          "remote.tls_verify": "false"})
    (_, port), opts = client_options(tls.remote)
    assert port == 6380 and opts["ssl"] and opts["ssl_ca_certs"] == "/ca.pem" and opts["ssl_cert_reqs"] == "none"
    assert opts["username"] == "u" and opts["password"] == "secret"
    assert "secret" not in tls.summary()
    for bad, msg in (({"remote.url": "http://x:1"}, "remote.url"),
                     ({"remote.url": "redis://x:1", "remote.tls_ca_file": "/ca"}, "rediss://"),
                     ({"remote.url": "rediss://x:1", "remote.tls_cert_file": "/c"}, "go together"),
                     ({"remote.write_policy": "always"}, "remote.write_policy")):
        with pytest.raises(ConfigError, match=msg):
            load(overrides=bad)


def test_remote_stats_become_prometheus_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    from kvtierd.metrics import Metrics
    from kvtierd.remote import RemoteTier

    tier = RemoteTier(load(overrides={"remote.url": "redis://127.0.0.1:7000"}).remote)
    tier.c.hits, tier.c.misses, tier.c.lookup_keys, tier.c.lookup_found = 5, 2, 10, 7
    tier.c.dropped["full"] = 3
    tier.c.latency["fetch"].observe(0.003)
    m = Metrics(stats_fn=lambda: {"remote": tier.stats()}, process_metrics=False)
    body, _ = m.render()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("kvtierd_remote_blocks_total", (("result", "hit"),))] == 5
    assert samples[("kvtierd_remote_lookup_keys_total", (("result", "miss"),))] == 3
    assert samples[("kvtierd_remote_dropped_writes_total", (("reason", "full"),))] == 3
    assert samples[("kvtierd_remote_up", ())] == 0           # never started
    assert samples[("kvtierd_remote_round_duration_seconds_bucket", (("le", "0.005"), ("op", "fetch")))] == 1
    assert samples[("kvtierd_remote_round_duration_seconds_count", (("op", "fetch"),))] == 1


def test_the_cost_model_knows_and_learns_the_remote_tier_rate():
    from kvtierd.integrations.cost import CostModel

    assert CostModel(device="cpu").load_rates["remote"] > 0          # a prior: lookups may report "remote"
    cm = CostModel(load_rates={"host": 10e9, "remote": 1e6}, prefill_token_s=1e-4, learn=False)
    plan = cm.plan(["host"] * 4 + ["remote"] * 4, 1 << 20, 256)
    assert plan.load_blocks == 4                                     # a slow remote tail is recomputed
    fast = CostModel(load_rates={"host": 10e9, "remote": 5e9}, prefill_token_s=1e-4, learn=False)
    assert fast.plan(["host"] * 4 + ["remote"] * 4, 1 << 20, 256).load_blocks == 8
    learner = CostModel(device="cpu")
    before = learner.load_rates["remote"]
    for _ in range(20):
        learner.observe_load(["remote"] * 8, 1 << 20, 8 * (1 << 20) / 2e9)   # 2 GB/s measured
    assert learner.load_rates["remote"] > 2 * before


def test_replies_are_parsed_by_hiredis():
    # hiredis is a daemon dependency: without it redis-py falls back to a Python parser several times slower.
    from redis.asyncio.connection import DefaultParser

    assert DefaultParser.__name__ == "_AsyncHiredisParser"
