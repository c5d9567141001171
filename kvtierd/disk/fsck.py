"""Offline verification and repair of a disk tier: `kvtierd fsck STATE_DIR [--repair]`.

Refuses to run while a daemon holds the directory (the store's flock). It
names every file in the directory that kvtierd did not write (strays: never
opened, never touched, not even by --repair); reads every record of every
segment, header and payload, and checks both checksums; checks each hint
file's checksums and that every record it lists is a record the segment
holds; then rebuilds the keydir the way the daemon would (hints + scans)
and checks that every block the daemon would serve lies on a record that
verified. Nothing is written without --repair. Any file content, however
damaged, gives a report, never a crash (tests/test_disk_fsck.py fuzzes it).

Damage counts as a problem only where the index points (a live record), or
as a torn tail; a damaged record no index entry refers to -- one a repair
already dropped, or one overwritten or deleted since -- is reported as
information ("N dead damaged records"): it is never read, and compaction
reclaims it. So fsck reports clean after a successful repair.

--repair: truncates torn segment tails (bytes after the last whole record
that run to the end of the file), forgets blocks whose records are damaged
and writes a tombstone for each (hints and scans read headers only and
would otherwise bring the damaged record back), deletes segment files that
are empty, removes hint files that are corrupt or disagree with their
segment, and writes the hint of every segment that lacks one. Damaged
records in the middle of a segment are left in place: they are skipped on
every scan, and compaction reclaims them.

Exit status: 0 clean (or repaired), 1 problems found and not repaired, 2
could not run (no such directory, in use, I/O error).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvtierd.config import DiskConfig
from kvtierd.disk import aligned_io, hints
from kvtierd.disk.format import PAGE, Header, checksum, parse_header
from kvtierd.disk.segments import SegmentStore
from kvtierd.disk.types import KEY, NS, OFF, SEG, entry_size


@dataclass
class SegmentReport:
    name: str
    size: int
    records: int = 0
    tombstones: int = 0
    bad_payloads: list[int] = field(default_factory=list)       # record offsets
    corrupt_regions: list[tuple[int, int]] = field(default_factory=list)
    valid_end: int = 0             # end of the last whole, valid record
    torn_from: int = -1            # damage from here to the end of the file
    starts: set[int] = field(default_factory=set)               # offsets of valid records


def verify_segment(fd: int, size: int, name: str, chunk: int) -> SegmentReport:
    """Read the whole segment, checking every header and payload checksum."""
    rep = SegmentReport(name, size)
    buf = aligned_io.alloc_aligned(chunk)
    mv = memoryview(buf)
    pos = 0
    bad_start = -1
    buf_off, buf_len = -1, 0
    limit = size - size % PAGE
    try:
        while pos + PAGE <= limit:
            if not (0 <= buf_off <= pos and pos + PAGE <= buf_off + buf_len):
                n = aligned_io.preadv_all(fd, [mv[:min(chunk, limit - pos)]], pos)
                n -= n % PAGE
                if n < PAGE:
                    break
                buf_off, buf_len = pos, n
            rel = pos - buf_off
            h = parse_header(mv, rel)
            if not isinstance(h, Header) or pos + h.size > size:
                bad_start = pos if bad_start < 0 else bad_start
                pos += PAGE
                continue
            if h.payload_len:
                if rel + h.size <= buf_len:
                    ok = checksum(mv[rel + PAGE:rel + PAGE + h.payload_len]) == h.payload_csum
                else:
                    big = aligned_io.alloc_aligned(h.size - PAGE)
                    got = aligned_io.preadv_all(fd, [big], pos + PAGE)
                    bmv = memoryview(big)
                    ok = got >= h.payload_len and checksum(bmv[:h.payload_len]) == h.payload_csum
                    bmv.release()
                    big.close()
                if not ok and bad_start >= 0:
                    pos += PAGE         # after damage, a header with a bad payload is not trusted as a record
                    continue
                if not ok:
                    rep.bad_payloads.append(pos)
            if bad_start >= 0:
                rep.corrupt_regions.append((bad_start, pos))
                bad_start = -1
            if h.flags:
                rep.tombstones += 1
            else:
                rep.records += 1
            rep.starts.add(pos)
            pos += h.size
            rep.valid_end = pos
        if bad_start >= 0 or rep.valid_end < size:
            rep.torn_from = bad_start if bad_start >= 0 else rep.valid_end
    finally:
        mv.release()
        buf.close()
    return rep


def run(state_dir: Path, repair: bool, out=sys.stdout) -> int:
    cfg = DiskConfig()
    cfg.io_threads = 1
    cfg.bytes = 1 << 62       # fsck checks what is there: no capacity to enforce, nothing to evict
    store = SegmentStore(cfg, state_dir)
    try:
        store.open(readonly=True)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        print(f"fsck: cannot open {state_dir}: {e}", file=out)
        return 2
    problems = 0
    try:
        for name in store.strays:
            print(f"stray: {name} (not written by kvtierd; ignored, left in place)", file=out)
        if store.strays:
            print(f"strays: {len(store.strays)} file(s) the daemon ignores; remove them by hand if unwanted",
                  file=out)

        reports = {}
        for seg in sorted(store.segments.values(), key=lambda s: s.id):
            reports[seg.id] = verify_segment(seg.fd, seg.size, seg.path.name, max(PAGE, cfg.io_bytes))

        bad_hints: list[int] = []
        for seg in sorted(store.segments.values(), key=lambda s: s.id):
            if seg.id not in store.hint_files:
                print(f"hint {hints.path_of(store.dir, seg.id).name}: none (a start scans the segment)", file=out)
                continue
            h, why = hints.load(store.dir, seg.id)
            if h is not None:
                stray = [int(o) for o in h.records["off"].tolist() if int(o) not in reports[seg.id].starts]
                if h.covered > seg.size:
                    why = f"covers {h.covered} bytes, the segment has {seg.size}"
                elif stray:
                    why = f"{len(stray)} of its records are not records of the segment (first at {stray[0]})"
            if why:
                print(f"hint {hints.path_of(store.dir, seg.id).name}: BAD: {why}", file=out)
                bad_hints.append(seg.id)
                problems += 1
            else:
                print(f"hint {hints.path_of(store.dir, seg.id).name}: ok ({len(h.records)} records)", file=out)
        for seg_id in bad_hints:         # the daemon's view must not rest on a hint fsck distrusts
            store.hint_files.discard(seg_id)

        store.recover()          # the keydir a daemon would build
        bad = []
        live_offsets: dict[int, set[int]] = {}
        with store.lock:
            for e in list(store.kd):
                seg_id, off = e[SEG], e[OFF]
                rep = reports.get(seg_id)
                live_offsets.setdefault(seg_id, set()).add(off)
                if (rep is None or off in rep.bad_payloads or off + entry_size(e) > rep.valid_end
                        or any(a <= off < b for a, b in rep.corrupt_regions)):
                    bad.append(e)

        # Damage only matters where the index points: a damaged record nothing refers to (a
        # block a repair dropped, or one overwritten or deleted since) is never read, and
        # compaction reclaims its space when it rewrites the segment. A torn tail is always
        # a problem: the next append would land after garbage.
        for seg_id, rep in sorted(reports.items()):
            live = live_offsets.get(seg_id, set())
            live_bad = [o for o in rep.bad_payloads if o in live]
            live_regions = [(a, b) for a, b in rep.corrupt_regions if any(a <= o < b for o in live)]
            dead = len(rep.bad_payloads) - len(live_bad) + len(rep.corrupt_regions) - len(live_regions)
            flags = []
            if live_bad:
                flags.append(f"{len(live_bad)} payload checksum failures")
            if live_regions:
                flags.append(f"{len(live_regions)} corrupt regions")
            if rep.torn_from >= 0:
                flags.append(f"torn tail from {rep.torn_from} ({rep.size - rep.torn_from} bytes)")
            problems += bool(live_bad) + bool(live_regions) + (rep.torn_from >= 0)
            note = f"; {dead} dead damaged records; compaction reclaims them" if dead else ""
            print(f"segment {rep.name}: {rep.size} bytes, {rep.records} records, {rep.tombstones} tombstones"
                  + (f"; PROBLEMS: {', '.join(flags)}" if flags else "; ok") + note, file=out)

        print(f"index: {store.kd.blocks} blocks the daemon would serve, {len(bad)} of them on bad records",
              file=out)
        problems += bool(bad)
        if problems == 0:
            print("fsck: clean", file=out)
            return 0
        if not repair:
            print(f"fsck: {problems} problem(s) found; run with --repair to fix what can be fixed", file=out)
            return 1

        # Forget the bad blocks through delete(): its tombstone keeps them forgotten, as hints
        # and scans read headers only and would otherwise bring back the damaged record
        # (or an older copy).
        with store.lock:
            for e in bad:
                store.delete(e[NS], e[KEY])
        for seg in list(store.segments.values()):
            rep = reports[seg.id]
            if rep.torn_from >= 0 and rep.torn_from >= rep.valid_end:
                os.ftruncate(seg.fd, rep.valid_end)
                os.fsync(seg.fd)
                store.truncated(seg, rep.valid_end)
                print(f"repair: truncated {rep.name} to {rep.valid_end} bytes", file=out)
                if seg.id not in bad_hints and seg.id in store.hint_files and seg.index is None:
                    # Its hint covered the cut bytes: the next start scans the segment instead
                    # and the daemon writes a new hint.
                    bad_hints.append(seg.id)
        for seg_id in bad_hints:
            hints.path_of(store.dir, seg_id).unlink(missing_ok=True)
            print(f"repair: removed the bad hint of {seg_id:016x}.seg", file=out)
        store.readonly = False
        store.ensure_epoch()
        store.reap_dead_segments()
        store.flush_tombstones()
        with store.lock:
            unwritten = len(store.pending_tombstones())
        if unwritten:
            raise OSError(f"{unwritten} tombstones of dropped blocks could not be written")
        err = store.sync_dirty()
        if err:
            raise OSError(err)
        with store.lock:
            store.seal()
        written = store.write_due_hints()
        print(f"repair: dropped {len(bad)} bad blocks, wrote {written} hint file(s) ({store.kd.blocks} blocks)",
              file=out)
        return 0
    except OSError as e:
        print(f"fsck: I/O error: {e}", file=out)
        return 2
    finally:
        store.readonly = True     # close() writes nothing for fsck
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtierd fsck", description="verify (and repair) a kvtierd disk tier")
    ap.add_argument("state_dir", type=Path, help="the daemon's state directory (holds disk/)")
    ap.add_argument("--repair", action="store_true",
                    help="truncate torn tails, drop bad blocks, replace bad hint files")
    args = ap.parse_args(argv)
    return run(args.state_dir, args.repair)


if __name__ == "__main__":
    sys.exit(main())
