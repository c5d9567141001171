"""Access domains in the policy and the config: which regions a uid gets, what it sees, what is refused."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from kvtierd.access import AccessPolicy, Gate, prefix_matches
from kvtierd.config import ConfigError, load
from kvtierd.protocol import Code, ProtocolError


def cfg(namespaces=None, domains=None, uids=(), gids=()):
    doms = {n: {"namespaces": tuple(p), "host_bytes": 1 << 24} for n, p in (domains or {}).items()}
    return SimpleNamespace(allowed_uids=tuple(uids), allowed_gids=tuple(gids), namespaces=dict(namespaces or {}),
                           domains=doms)


def policy(**kw):
    return AccessPolicy(cfg(**kw), own_uid=1000, own_gid=1000)


def test_prefixes_are_whole_segments():
    assert prefix_matches("tenant-a", "tenant-a") and prefix_matches("tenant-a", "tenant-a/x")
    assert prefix_matches("tenant-a/", "tenant-a/x") and not prefix_matches("tenant-a", "tenant-ab")
    assert prefix_matches("", "anything") and not prefix_matches("a/b", "a")


def test_a_namespace_lives_in_the_domain_of_its_longest_prefix():
    p = policy(domains={"A": ["tenant-a"], "A2": ["tenant-a/inner"], "B": ["tenant-b/", "shared-b"]})
    assert p.domain_of("tenant-a/x") == "A" and p.domain_of("tenant-a") == "A"
    assert p.domain_of("tenant-a/inner/x") == "A2"
    assert p.domain_of("tenant-b/x") == "B" and p.domain_of("shared-b") == "B"
    assert p.domain_of("tenant-ab") == "default" and p.domain_of("other") == "default"


def test_a_uid_gets_exactly_the_domains_holding_a_namespace_it_may_open():
    p = policy(namespaces={"tenant-a": [1], "tenant-a/shared": [2], "tenant-b": [3]},
               domains={"A": ["tenant-a"], "B": ["tenant-b"]})
    # No rule covers every namespace outside the domains: the default domain is open to all.
    assert p.domains_for(1) == ["default", "A"]
    assert p.domains_for(2) == ["default", "A"]        # tenant-a/shared is in A's region
    assert p.domains_for(3) == ["default", "B"]
    assert p.domains_for(4) == ["default"]
    assert p.domains_for(0) == p.domains_for(1000) == ["default", "A", "B"]   # root, the daemon's uid
    closed = policy(namespaces={"tenant-a": [1], "": [9]}, domains={"A": ["tenant-a"], "open": ["pub"]})
    assert closed.domains_for(4) == []                 # may open nothing: gets no region at all
    assert closed.domains_for(9) == ["default", "open"]     # 'pub' falls under "" too
    assert closed.domains_for(1) == ["A"]


def test_a_nested_domain_is_not_handed_to_users_of_the_outer_one():
    p = policy(namespaces={"tenant-a": [1], "tenant-a/inner": [2], "": [5]},
               domains={"A": ["tenant-a"], "A2": ["tenant-a/inner"]})
    assert p.domains_for(1) == ["A"]
    assert p.domains_for(2) == ["A2"]
    assert p.domains_for(5) == ["default"]


def test_a_domain_without_rules_is_open_to_every_admitted_uid():
    p = policy(namespaces={"tenant-a": [1]}, domains={"lab": ["lab"], "A": ["tenant-a"]})
    assert p.domains_for(7) == ["default", "lab"]
    assert p.may_open("lab/x", 7) and not p.may_open("tenant-a/x", 7)
    # A rule above the domain's prefix governs it: "" = [1] closes 'lab' too.
    closed = policy(namespaces={"": [1]}, domains={"lab": ["lab"]})
    assert closed.domains_for(7) == [] and closed.domains_for(1) == ["default", "lab"]


def test_reloaded_rules_change_who_gets_a_domain_but_not_the_domains():
    p = policy(namespaces={"tenant-a": [1]}, domains={"A": ["tenant-a"]})
    assert p.domains_for(2) == ["default"]
    p.reload(cfg(namespaces={"tenant-a": [1, 2]}, domains={"B": ["tenant-a"]}))
    assert p.domains_for(2) == ["default", "A"]
    assert p.domain_of("tenant-a/x") == "A"            # domains are fixed for the daemon's life


def test_stats_and_hot_show_only_what_the_uid_may_open():
    p = policy(namespaces={"tenant-a": [1], "tenant-b": [2]}, domains={"A": ["tenant-a"], "B": ["tenant-b"]})
    stats = {"namespaces": [{"name": "tenant-a/x"}, {"name": "tenant-b/y"}, {"name": "public"}],
             "domains": {"default": {}, "A": {}, "B": {}}, "misses": 3}
    mine = p.filter_stats(stats, 1)
    assert [n["name"] for n in mine["namespaces"]] == ["tenant-a/x", "public"]
    assert sorted(mine["domains"]) == ["A", "default"] and mine["misses"] == 3
    assert p.filter_stats(stats, 0) == stats
    hot = {"tenant-a/x": [["00", 1]], "tenant-b/y": [["01", 2]]}
    assert p.filter_hot(hot, 2) == {"tenant-b/y": [["01", 2]]}
    assert p.filter_hot(hot, 1000) == hot
    assert stats["namespaces"][1]["name"] == "tenant-b/y"     # the caller's copy only is filtered


def test_admission_fails_closed():
    p = policy()
    ok, why, creds = p.admit_peer(None)
    assert not ok and creds is None and "no socket" in why

    class Broken:
        def getsockopt(self, *a):
            raise OSError(95, "Operation not supported")
    ok, why, creds = p.admit_peer(Broken())
    assert not ok and "credentials" in why
    a, b = socket.socketpair()
    with a, b:
        ok, why, creds = AccessPolicy(cfg(), own_uid=os.getuid(), own_gid=os.getgid()).admit_peer(a)
        assert ok and creds == (os.getpid(), os.getuid(), os.getgid())


def test_open_in_a_domain_the_connection_did_not_receive_is_refused():
    p = policy(namespaces={"tenant-a": [1]}, domains={"A": ["tenant-a"]})
    gate = Gate(p, SimpleNamespace(regions={}))
    conn = SimpleNamespace(uid=2, domains=frozenset({"default"}))     # what its HELLO handed over
    assert gate.domain_for_open(conn, "public") == "default"
    with pytest.raises(ProtocolError) as e:
        gate.domain_for_open(conn, "tenant-a/x")        # rules widened by SIGHUP after this HELLO
    assert e.value.code == Code.DENIED and "reconnect" in e.value.message


def test_the_hbm_handle_goes_only_to_the_default_domain():
    from kvtierd.tiers.host import HostRegion
    regions = {"default": HostRegion(1 << 20, 1 << 16), "A": HostRegion(1 << 20, 1 << 16, domain="A")}
    try:
        p = policy(namespaces={"tenant-a": [1], "": [2]}, domains={"A": ["tenant-a"]})
        store = SimpleNamespace(regions=regions, hbm_descriptors=lambda: [{"handle": b"ipc"}])
        gate = Gate(p, store)
        tenant, other = SimpleNamespace(uid=1), SimpleNamespace(uid=2)
        r1, r2 = gate.hello(tenant, {}), gate.hello(other, {})
        assert [h["domain"] for h in r1.reply["host"]] == ["A"] and r1.reply["hbm"] == []
        assert r1.fds == [regions["A"].fd]
        assert [h["domain"] for h in r2.reply["host"]] == ["default"] and r2.reply["hbm"] == [{"handle": b"ipc"}]
        with pytest.raises(ProtocolError, match="already"):
            gate.hello(tenant, {})                       # regions go out once per connection
    finally:
        for r in regions.values():
            r.close()


def test_domains_load_from_toml(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('[access]\ndomains = { tenant-a = { namespaces = ["tenant-a", "team-a/"], host_bytes = "64MiB" } }\n'
                 '[host]\nslab_bytes = "1MiB"\n')
    c = load(f)
    assert c.access.domains == {"tenant-a": {"namespaces": ("tenant-a", "team-a/"), "host_bytes": 64 << 20}}
    assert load(None).access.domains == {}              # the single-user default: no domains


@pytest.mark.parametrize("domains, needle", [
    ({"default": {"namespaces": ["x"], "host_bytes": "64MiB"}}, "not 'default'"),
    ({"a b": {"namespaces": ["x"], "host_bytes": "64MiB"}}, "domain name"),
    ({"a": {"namespaces": [], "host_bytes": "64MiB"}}, "non-empty list"),
    ({"a": {"namespaces": [""], "host_bytes": "64MiB"}}, "non-empty prefixes"),
    ({"a": {"namespaces": ["x"]}}, "host_bytes"),
    ({"a": {"namespaces": ["x"], "host_bytes": "64MiB", "uids": [1]}}, "expected"),
    ({"a": {"namespaces": ["x"], "host_bytes": "64MiB"}, "b": {"namespaces": ["x/"], "host_bytes": "64MiB"}},
     "in domains 'a' and 'b'"),
    ({"a": {"namespaces": ["x"], "host_bytes": "1MiB"}}, "at least host.slab_bytes"),
])
def test_bad_domains_name_the_problem(domains, needle):
    with pytest.raises(ConfigError, match="access.domains") as e:
        load(None, {"access.domains": domains})
    assert needle in str(e.value)


def test_fds_are_never_sent_out_of_order_or_without_a_socket():
    from kvtierd.regions import send_with_fds

    class Transport:
        def __init__(self, buffered: int, sock):
            self.buffered, self.sock, self.written = buffered, sock, b""

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def get_extra_info(self, name: str):
            return self.sock

        def write(self, data: bytes) -> None:
            self.written += data

    with pytest.raises(ProtocolError) as e:        # earlier replies still queued: the fds would overtake them
        send_with_fds(Transport(5, None), b"frame", [0])
    assert e.value.code == Code.NO_HELLO
    with pytest.raises(ProtocolError) as e:        # no socket object: refused, not guessed
        send_with_fds(Transport(0, None), b"frame", [0])
    assert e.value.code == Code.INTERNAL
    a, b = socket.socketpair()
    with a, b:
        b.close()                                  # the peer hung up: an error reply, not an exception
        with pytest.raises(ProtocolError, match="cannot pass the region fds"):
            send_with_fds(Transport(0, a), b"frame", [a.fileno()])
    t = Transport(0, None)
    send_with_fds(t, b"no fds", [])                # nothing to attach: an ordinary write
    assert t.written == b"no fds"
