"""Access control: peer credentials from the kernel, admission, namespace rules, socket permissions."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kvtierd.access import (
    AccessError,
    AccessPolicy,
    apply_socket_mode,
    bind_unix_listener,
    peer_credentials,
    peer_groups,
)


def cfg(uids=(), gids=(), namespaces=None):
    return SimpleNamespace(allowed_uids=tuple(uids), allowed_gids=tuple(gids), namespaces=dict(namespaces or {}))


def test_peer_credentials_name_the_connecting_process():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
        groups = peer_groups(a)
        assert set(groups) <= set(os.getgroups()) | {os.getgid()}


def test_peer_credentials_of_another_process_over_a_listening_socket(tmp_path):
    path = str(tmp_path / "s.sock")
    srv = bind_unix_listener(path, 0o600)
    srv.setblocking(True)
    child = subprocess.Popen([sys.executable, "-c",
                              f"import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({path!r}); "
                              f"s.recv(1)"])
    try:
        conn, _ = srv.accept()
        with conn:
            pid, uid, gid = peer_credentials(conn)
            assert pid == child.pid and uid == os.getuid() and gid == os.getgid()
            conn.sendall(b"x")
        child.wait(timeout=10)
    finally:
        srv.close()
        if child.poll() is None:
            child.kill()


def test_default_policy_admits_own_uid_own_gid_and_root_only():
    p = AccessPolicy(cfg(), own_uid=1000, own_gid=1000)
    assert p.admit(1000, 5000) == (True, "uid 1000 allowed")
    assert p.admit(5000, 1000) == (True, "gid 1000 allowed")
    assert p.admit(0, 0) == (True, "root")
    ok, why = p.admit(2000, 2000)
    assert not ok and "uid 2000 gid 2000" in why and "access.allowed_uids [1000]" in why


def test_supplementary_groups_admit_members_of_an_allowed_group():
    p = AccessPolicy(cfg(gids=[990]), own_uid=1000, own_gid=1000)
    assert p.admit(2000, 2000, groups=[4, 990]) == (True, "supplementary gid 990 allowed")
    assert p.admit(2000, 2000, groups=[4])[0] is False
    assert p.admit(2000, 1000)[0] is False          # an explicit list replaces the default own gid


def test_namespace_rules_use_the_longest_matching_prefix():
    p = AccessPolicy(cfg(uids=[1000, 2000, 3000], namespaces={"llama": [2000], "llama/tenantB": [3000]}),
                     own_uid=1000, own_gid=1000)
    assert p.may_open("llama/3-8b", 2000)
    assert not p.may_open("llama/3-8b", 3000)
    assert p.may_open("llama/tenantB/x", 3000)
    assert not p.may_open("llama/tenantB/x", 2000)   # the longer prefix decides, not the first
    assert p.may_open("mistral", 3000)                # matches no prefix: open to admitted clients
    assert p.may_open("llama/tenantB/x", 0) and p.may_open("llama/tenantB/x", 1000)   # root, the daemon
    assert "prefix 'llama/tenantB'" in p.why_not("llama/tenantB/x", 2000)


def test_prefixes_match_whole_path_segments():
    p = AccessPolicy(cfg(uids=[2000, 3000], namespaces={"tenant-a": [2000], "tenant-b/": [3000]}),
                     own_uid=1000, own_gid=1000)
    assert p.may_open("tenant-a", 2000) and p.may_open("tenant-a/x/y", 2000)
    assert not p.may_open("tenant-a", 3000) and not p.may_open("tenant-a/x", 3000)
    assert p.may_open("tenant-ab", 3000)              # not under 'tenant-a': no rule applies
    assert p.may_open("tenant-b", 3000) and not p.may_open("tenant-b/x", 2000)   # a trailing '/' is the same rule
    assert p.may_open("tenant-bb/x", 2000)


def test_an_empty_prefix_closes_every_other_namespace():
    p = AccessPolicy(cfg(namespaces={"": [2000], "public": [2000, 3000]}), own_uid=1000, own_gid=1000)
    assert not p.may_open("anything", 3000)
    assert p.may_open("public/x", 3000)
    assert not p.may_open("public-x", 3000)
    assert p.may_open("anything", 2000)


def test_reload_swaps_the_rules():
    p = AccessPolicy(cfg(), own_uid=1000, own_gid=1000)
    assert not p.admit(2000, 2000)[0]
    p.reload(cfg(uids=[2000], namespaces={"a": [1]}))
    assert p.admit(2000, 2000)[0]
    assert not p.admit(1000, 5000)[0]                 # an explicit uid list replaces the default own uid
    assert not p.may_open("a/bc", 2000) and p.may_open("abc", 2000)
    with pytest.raises(ValueError, match="access.namespaces"):
        p.reload(cfg(namespaces={"a": [-1]}))
    assert p.admit(2000, 2000)[0]                     # a bad reload leaves the old rules in force


def test_apply_socket_mode_sets_mode_and_group(tmp_path):
    f = tmp_path / "sock"
    f.write_bytes(b"")
    own_group = __import__("grp").getgrgid(os.getgid()).gr_name
    apply_socket_mode(f, 0o640, own_group)
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
    apply_socket_mode(f, 0o600)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600


def test_apply_socket_mode_errors_say_what_to_fix(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"")
    with pytest.raises(AccessError, match="no group named 'no-such-group-kvtierd'"):
        apply_socket_mode(f, 0o660, "no-such-group-kvtierd")
    with pytest.raises(AccessError, match="does not exist"):
        apply_socket_mode(tmp_path / "missing", 0o660)
    with pytest.raises(AccessError, match="not a permission mode"):
        apply_socket_mode(f, 0o7777)


def test_bind_unix_listener_applies_the_mode_before_listening_and_replaces_only_stale_sockets(tmp_path):
    path = tmp_path / "kvtierd.sock"
    s1 = bind_unix_listener(path, 0o660)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with pytest.raises(AccessError, match="already listening"):
            bind_unix_listener(path, 0o660)
    finally:
        s1.close()
    s2 = bind_unix_listener(path, 0o600)          # the file left by s1 is stale now: replaced
    s2.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(AccessError, match="not a socket"):
        bind_unix_listener(regular, 0o660)
    assert regular.read_text() == "keep me"
