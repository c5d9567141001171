"""Leases and reservations, indexed by owner (a connection) and by deadline.

A lease is a reader's claim on entries; a reservation is a writer's claim on
fresh slots until commit. Both end on release/commit/abort, when the owner's
connection closes, or at their deadline. A deadline does not free the slots:
the owner may still have the region mapped and be about to write (a GC pause,
SIGSTOP), so the store *fences* it: the handle is revoked, its slots stay
quarantined, the owner's connection is closed (Store.on_revoke), and only when
the connection is gone (drop_owner) are the slots released. Finding expired
handles is a heap pop, not a scan of every handle.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from kvtierd.core.index import Entry, Namespace
from kvtierd.protocol import Code, ProtocolError


@dataclass(eq=False)
class Lease:
    lid: int
    owner: int
    entries: list[Entry | None]
    deadline: float


@dataclass(eq=False)
class Reservation:
    rid: int
    owner: int
    ns: Namespace
    entries: list[Entry]
    index: list[int]                 # positions (in the request's keys) that got a slot
    deadline: float
    full: list[int] = field(default_factory=list)   # positions that found no room


class Handles:
    def __init__(self) -> None:
        self.leases: dict[int, Lease] = {}
        self.reservations: dict[int, Reservation] = {}
        self._by_owner: dict[int, set[int]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._quarantine: dict[int, list[Entry]] = {}     # owner -> entries fenced until it is gone
        self.revoked_owners: set[int] = set()
        self._ids = itertools.count(1)

    def _track(self, owner: int, hid: int, deadline: float) -> None:
        self._by_owner.setdefault(owner, set()).add(hid)
        heapq.heappush(self._deadlines, (deadline, hid))

    def _untrack(self, owner: int, hid: int) -> None:
        ids = self._by_owner.get(owner)
        if ids is not None:
            ids.discard(hid)
            if not ids:
                del self._by_owner[owner]
        # Ended handles stay in the deadline heap until their deadline; past twice the live count the
        # heap is rebuilt from the live ones (amortised O(1) per handle), so its size follows the number of
        # handles held, not the request rate times the timeout.
        if len(self._deadlines) > 2 * (len(self.leases) + len(self.reservations)) + 1024:
            live = [(h.deadline, i) for i, h in self.leases.items()]
            live += [(h.deadline, i) for i, h in self.reservations.items()]
            heapq.heapify(live)
            self._deadlines = live

    def add_lease(self, owner: int, entries: list[Entry | None], deadline: float) -> Lease:
        lease = Lease(next(self._ids), owner, entries, deadline)
        self.leases[lease.lid] = lease
        self._track(owner, lease.lid, deadline)
        return lease

    def add_reservation(self, owner: int, ns: Namespace, entries: list[Entry], index: list[int],
                        full: list[int], deadline: float) -> Reservation:
        res = Reservation(next(self._ids), owner, ns, entries, index, deadline, full)
        self.reservations[res.rid] = res
        self._track(owner, res.rid, deadline)
        return res

    def lease(self, lid: int, owner: int) -> Lease:
        lease = self.leases.get(lid)
        if lease is None or lease.owner != owner:
            raise ProtocolError(Code.BAD_HANDLE, f"no lease {lid} on this connection")
        return lease

    def reservation(self, rid: int, owner: int) -> Reservation:
        res = self.reservations.get(rid)
        if res is None or res.owner != owner:
            raise ProtocolError(Code.BAD_HANDLE, f"no reservation {rid} on this connection (committed, aborted "
                                                 f"or timed out)")
        return res

    def pop_lease(self, lease: Lease) -> None:
        del self.leases[lease.lid]
        self._untrack(lease.owner, lease.lid)

    def pop_reservation(self, res: Reservation) -> None:
        del self.reservations[res.rid]
        self._untrack(res.owner, res.rid)

    def owned(self, owner: int) -> tuple[list[Lease], list[Reservation]]:
        ids = self._by_owner.get(owner, ())
        return ([self.leases[i] for i in ids if i in self.leases],
                [self.reservations[i] for i in ids if i in self.reservations])

    def holds_any(self, owner: int) -> bool:
        return bool(self._by_owner.get(owner)) or owner in self._quarantine

    def expired(self, now: float) -> tuple[list[Lease], list[Reservation]]:
        """Handles whose deadline passed (each once); handles already gone are skipped."""
        leases: list[Lease] = []
        reservations: list[Reservation] = []
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, hid = heapq.heappop(heap)
            if hid in self.leases:
                leases.append(self.leases[hid])
            elif hid in self.reservations:
                reservations.append(self.reservations[hid])
        return leases, reservations

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][1] not in self.leases and heap[0][1] not in self.reservations:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def fence(self, owner: int, entries: list[Entry]) -> None:
        """Keeps these entries' slots until the owner is gone."""
        self._quarantine.setdefault(owner, []).extend(entries)
        self.revoked_owners.add(owner)

    def unfence(self, owner: int) -> list[Entry]:
        self.revoked_owners.discard(owner)
        return self._quarantine.pop(owner, [])

    def quarantined(self) -> int:
        return sum(len(v) for v in self._quarantine.values())
