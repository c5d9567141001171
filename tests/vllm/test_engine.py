"""A real vLLM engine serving through kvtierd: prefixes move between engine processes, correctly.

Engines a and b are separate processes with the connector; they share blocks only through
the daemon. `baseline` has no connector and gives the reference outputs. Every prompt is
fresh, so vLLM's own prefix cache never supplies what the test attributes to kvtierd
(RequestOutput.num_cached_tokens counts local and kvtierd tokens together).
"""

from __future__ import annotations

from conftest import BLOCK, BLOCK_BYTES, prompt, same_output, wait_until


def block_keys(ids: list[int], salt: str | None = None) -> list[bytes]:
    """vLLM's block hashes of a prompt, computed here, in another process than the engines."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu

    kcu.init_none_hash(sha256)
    parent, keys = None, []
    for i in range(len(ids) // BLOCK):
        extra = (("cache_salt", salt),) if salt and i == 0 else None
        parent = kcu.hash_block_tokens(sha256, parent, ids[i * BLOCK:(i + 1) * BLOCK], extra)
        keys.append(bytes(parent))
    return keys


def vllm_namespace(client):
    names = [n["name"] for n in client.stats()["namespaces"] if n["name"].startswith("vllm/")]
    assert len(names) == 1, names
    return client.namespace(names[0], block_size=BLOCK_BYTES)


def full_chunks(n_tokens: int) -> int:
    """Chunks kvtierd can supply for an n-token prompt: full blocks, at least one token left to compute."""
    return (n_tokens - 1) // BLOCK


def test_daemon_down_at_engine_start_serves_correctly(engines):
    before = engines.before_daemon
    ids = before["ids"]
    assert same_output(before["a"], engines.reference(ids))
    assert before["a"]["cached"] == 0
    assert same_output(before["a_again"], engines.reference(ids + [7, 8]))


def test_cross_instance_prefix_reuse_matches_an_engine_without_kvtierd(engines):
    ids = prompt("cross", 330)
    suffix = prompt("cross-suffix", 9)
    out_a = engines.a.generate([ids])[0]
    assert same_output(out_a, engines.reference(ids))
    with engines.daemon.client() as c:
        ns = vllm_namespace(c)
        keys = block_keys(ids)
        # keys computed in this process equal the engine's: hashes agree across processes
        assert ns.lookup(keys) == full_chunks(len(ids)) == len(keys) == 10
        hits_before = next(n["hits"] for n in c.stats()["namespaces"] if n["name"] == ns.name)
    out_b = engines.b.generate([ids + suffix])[0]
    assert out_b["cached"] == len(keys) * BLOCK
    ref = engines.reference(ids + suffix)
    assert out_b["tokens"] == ref["tokens"]
    assert same_output(out_b, ref), (out_b, ref)
    with engines.daemon.client() as c:
        st = next(n for n in c.stats()["namespaces"] if n["name"] == ns.name)
        assert st["hits"] >= hits_before + len(keys)


def test_a_wrong_load_changes_the_output(engines):
    """Negative control: replace a stored block with garbage under the same key (deleted, then stored again
    through the daemon, so the garbage carries a valid checksum); the engine that loads it must produce
    different logprobs, which shows the loaded K/V is what the model runs on."""
    ids = prompt("negative", 200)
    suffix = prompt("negative-suffix", 5)
    engines.a.generate([ids])
    with engines.daemon.client() as c:
        ns = vllm_namespace(c)
        keys = block_keys(ids)
        assert ns.lookup(keys) == len(keys)
        assert ns.delete([keys[1]]) == 1
        garbage = bytes((i * 37 + 11) % 256 for i in range(BLOCK_BYTES))
        assert ns.put_many([keys[1]], [garbage]) == 1
        assert ns.lookup(keys) == len(keys)
    out_b = engines.b.generate([ids + suffix])[0]
    ref = engines.reference(ids + suffix)
    assert out_b["cached"] == len(keys) * BLOCK
    assert not same_output(out_b, ref, tol=1e-3), "output unchanged by garbage K/V: the load is not used"


def test_a_removed_block_is_recomputed(engines):
    ids = prompt("removed", 260)
    suffix = prompt("removed-suffix", 4)
    engines.a.generate([ids])
    with engines.daemon.client() as c:
        ns = vllm_namespace(c)
        keys = block_keys(ids)
        assert ns.delete([keys[3]]) == 1
    out_b = engines.b.generate([ids + suffix])[0]
    assert out_b["cached"] == 3 * BLOCK          # the prefix up to the hole
    assert same_output(out_b, engines.reference(ids + suffix))


def test_tenants_never_share_blocks(engines):
    ids = prompt("tenants", 230)
    engines.a.generate([ids], salt="alice")
    with engines.daemon.client() as c:
        ns = vllm_namespace(c)
        assert ns.lookup(block_keys(ids, "alice")) == full_chunks(len(ids))
        assert ns.lookup(block_keys(ids, "bob")) == ns.lookup(block_keys(ids)) == 0
    other = engines.b.generate([ids + [9]], salt="bob")[0]
    assert other["cached"] == 0
    assert same_output(other, engines.reference(ids + [9]))
    unsalted = engines.b.generate([ids + [10]])[0]
    assert unsalted["cached"] == 0
    same = engines.b.generate([ids + [11]], salt="alice")[0]
    assert same["cached"] == full_chunks(len(ids)) * BLOCK
    assert same_output(same, engines.reference(ids + [11]))


def test_restart_on_the_same_state_dir_serves_from_disk_and_a_corrupt_block_is_recomputed(engines):
    kept = prompt("restart", 300)
    damaged = prompt("corrupt", 240)
    engines.a.generate([kept, damaged])
    kept_keys, damaged_keys = block_keys(kept), block_keys(damaged)
    with engines.daemon.client() as c:
        name = vllm_namespace(c).name
    engines.daemon.stop()            # a clean stop writes the host tier to disk
    seg_dir = engines.daemon.root / "state" / "disk"
    hit = None
    for seg in sorted(seg_dir.glob("*.seg")):
        data = seg.read_bytes()
        at = data.find(damaged_keys[2])
        if at >= 0:
            hit = (seg, at)
    assert hit is not None, "the block was not written to the disk tier"
    seg, at = hit
    header = at - at % 4096
    with open(seg, "r+b") as f:        # flip a payload byte: the record's checksum no longer matches
        f.seek(header + 4096 + 1000)
        b = f.read(1)
        f.seek(header + 4096 + 1000)
        f.write(bytes([b[0] ^ 0xFF]))
    engines.daemon.start()
    with engines.daemon.client() as c:
        wait_until(lambda: c.stats()["disk"].get("recovery_done"), 60, "disk recovery")
        ns = c.namespace(name, block_size=BLOCK_BYTES)   # the disk index keeps blocks by namespace name
        assert set(ns.lookup_tiers(kept_keys)) == {"disk"}
    out = engines.b.generate([kept + [5, 6]])[0]
    assert out["cached"] == len(kept_keys) * BLOCK
    assert same_output(out, engines.reference(kept + [5, 6]))
    out = engines.b.generate([damaged + [5, 6]])[0]
    # The lookup still counted the damaged chunk (num_cached_tokens is fixed at scheduling); the
    # load found it failed its checksum, reported it and the chunks after it, and vLLM recomputed them.
    assert same_output(out, engines.reference(damaged + [5, 6]))
    assert "checksum mismatch" in engines.daemon.proc.log()
    wait_until(lambda: logged_counter(engines, "load_errors") >= len(damaged_keys) - 2, 90,
               "engine b to log its load errors", step=0.5)


def test_daemon_killed_mid_serving_every_request_completes_correctly(engines):
    prompts = [prompt(f"killed-{i}", 150 + 10 * i) for i in range(6)]
    engines.a.generate(prompts)                  # stored: b would load them
    engines.b.send([p + [3] for p in prompts])
    first = engines.b.next(timeout=120)
    assert first.get("progress") == 1
    engines.daemon.kill()                        # SIGKILL while b works through the batch
    outs = engines.b.result()
    for p, o in zip(prompts, outs, strict=True):
        assert same_output(o, engines.reference(p + [3]))
    # with the daemon gone the engines still serve, with no hits
    lone = prompt("killed-lone", 120)
    assert same_output(engines.b.generate([lone])[0], engines.reference(lone))
    engines.daemon.start()                       # same socket: the connectors reconnect on their own
    attempts = iter(range(100))

    def served_again():
        # Each engine's links retry on their own backoff (doubling from retry_s while the daemon was
        # down), so a may store again before b looks again: a fresh prompt per attempt.
        p = prompt(f"after-restart-{next(attempts)}", 200)
        engines.a.generate([p])
        if not _stored(engines, p):
            return None
        out = engines.b.generate([p + [4]])[0]
        return (p, out) if out["cached"] == full_chunks(len(p)) * BLOCK else None

    fresh, out = wait_until(served_again, 120, "engine a to store again and engine b to load from the daemon")
    assert same_output(out, engines.reference(fresh + [4]))


def _stored(engines, ids) -> bool:
    with engines.daemon.client() as c:
        names = [n["name"] for n in c.stats()["namespaces"] if n["name"].startswith("vllm/")]
        if not names:
            return False
        ns = c.namespace(names[0], block_size=BLOCK_BYTES)
        return ns.lookup(block_keys(ids)) == full_chunks(len(ids))



def logged_counter(engines, name: str, attempts=iter(range(10**6))) -> int:
    """Sum of engine b's kvtierd_<name> in its 'KV Transfer metrics' log lines, after one more small
    request (vLLM logs stats as it steps)."""
    import re
    engines.b.generate([prompt(f"stats-{next(attempts)}", 40)], max_tokens=2)
    return sum(int(v) for v in re.findall(rf"kvtierd_{name}=(\d+)", engines.b.log_path.read_text()))


def test_connector_counters_reach_vllms_stats_log(engines):
    """KVTierStats travel through vLLM's connector stats hooks (worker -> scheduler -> logger)."""
    wait_until(lambda: logged_counter(engines, "loaded_chunks") > 0 and logged_counter(engines, "hit_tokens") > 0,
               90, "engine b's 'KV Transfer metrics' log line with kvtierd counters", step=0.5)
