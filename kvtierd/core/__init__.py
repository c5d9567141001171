"""The block store: index, block states, leases and reservations, per-tier LRU, movement between tiers.

    states.py   the life of one block: states, allowed transitions, who owns the slot
    index.py    namespaces and their entries (one Entry per block in a memory tier)
    lru.py      a memory tier: its slots and the LRU of idle blocks per size class
    handles.py  leases and reservations per owner, deadlines, fenced revocation
    mover.py    moves between tiers: disk loads, demotion, promotion, making room
    store.py    the facade the server calls
"""

from kvtierd.core.store import Store

__all__ = ["Store"]
