"""The life of one block: its states, the allowed transitions, and who owns its slot.

An Entry is one block in a memory tier (host, or HBM). Every change of its state
goes through `move(e, to)`, which refuses a transition not in TRANSITIONS, and
its slot is freed only by `Slots.settle`, once, when nothing refers to it.

    state     readers see it   the slot belongs to               leaves by
    RESERVED  no               the writer (its reservation)      commit -> READY; abort, timeout, hang-up,
                                                                 namespace drop -> DELETED
    LOADING   wait for it      the mover (a disk read into it)   read done -> READY; read failed -> DELETED
    READY     yes              the index (in the LRU if idle)    demote/copy -> MOVING; delete, evict,
                                                                 corrupt, drop -> DELETED
    MOVING    yes (in place)   the mover's I/O, plus leases      copy done -> READY (relocated or not);
                                                                 evicted, deleted -> DELETED
    DELETED   no               whoever still refers to it        the last reference ends -> FREED
    FREED     no               nobody: back in the allocator     (final)

References that keep a DELETED entry's slot: `leases` (readers and the
writer's lease-like claim), `io` (a disk write or read, a DMA, a checksum in a
thread) and `fenced` (a writer whose reservation or lease timed out while it may
still have the region mapped: the slot stays quarantined until its connection
is gone, so a stalled writer that resumes cannot write into another block).
"""

from __future__ import annotations

RESERVED, LOADING, READY, MOVING, DELETED, FREED = range(6)
NAMES = ("RESERVED", "LOADING", "READY", "MOVING", "DELETED", "FREED")

TRANSITIONS: dict[int, frozenset[int]] = {
    RESERVED: frozenset({READY, DELETED}),
    LOADING: frozenset({READY, DELETED}),
    READY: frozenset({MOVING, DELETED}),
    MOVING: frozenset({READY, DELETED}),
    DELETED: frozenset({FREED}),
    FREED: frozenset(),
}

# States whose bytes a reader may be handed.
READABLE = frozenset({READY, MOVING})


class TransitionError(RuntimeError):
    """A block was asked to change state in a way the state machine does not allow: a bug, counted and logged."""


def move(e, to: int) -> None:
    """Changes e.state to `to`, or raises TransitionError leaving it unchanged."""
    if to not in TRANSITIONS[e.state]:
        raise TransitionError(f"block {e.key.hex()[:16]} of {e.ns.name!r}: {NAMES[e.state]} -> {NAMES[to]} "
                              f"is not a transition")
    e.state = to
