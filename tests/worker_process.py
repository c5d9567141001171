"""A worker process for the copy-path tests: stores or loads a paged KV cache.

Usage: python worker_process.py SOCKET store|load|hold DEVICE SEED [TIER]
The cache content is a function of SEED, so any process can check any other's.
Prints one JSON line.
"""

import json
import sys
import time

import torch

from kvtierd import Client
from kvtierd.gpu.paged import PagedCopier, PagedLayout

LAYERS, PAGES, PAGE_TOKENS, HEADS, DIM, GROUP = 4, 64, 16, 2, 64, 2
NBLOCKS = PAGES // GROUP


def make_cache(device, seed, poison=False):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        kv = []
        for _ in range(2):
            t = torch.randn(PAGES, PAGE_TOKENS, HEADS, DIM, generator=g).to(torch.bfloat16)
            kv.append((torch.full_like(t, -7.0) if poison else t).to(device))
        layers.append(tuple(kv))
    return layers


def keys_for(seed):
    return [b"w%d-%d" % (seed, i) for i in range(NBLOCKS)]


def main():
    path, mode, device, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tier = sys.argv[5] if len(sys.argv) > 5 else ("host" if mode == "store" else "any")
    # Page ids in a shuffled order: blocks gather scattered pages.
    order = torch.randperm(PAGES, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    with Client(path) as c:
        ref = make_cache(device, seed)
        layout_ref = PagedLayout.from_layers(ref, pages_per_block=GROUP)
        ns = c.namespace("worker-test", block_size=layout_ref.block_bytes)
        if mode == "store":
            n = ns.store_pages(PagedCopier(layout_ref), order, keys_for(seed), tier=tier)
            print(json.dumps({"stored": n, "tiers": ns.lookup_tiers(keys_for(seed))}), flush=True)
        elif mode == "load":
            out = make_cache(device, seed, poison=True)
            n = ns.load_pages(PagedCopier(PagedLayout.from_layers(out, pages_per_block=GROUP)),
                              keys_for(seed), order, tier=tier)
            same = all(torch.equal(a, b) for la, lb in zip(out, ref) for a, b in zip(la, lb))
            print(json.dumps({"loaded": n, "equal": same}), flush=True)
        elif mode == "hold":
            lease = ns.acquire(keys_for(seed))
            print(json.dumps({"holding": lease.count}), flush=True)
            time.sleep(600)


if __name__ == "__main__":
    main()
