"""The daemon's frame buffer pool: what it keeps for the next frame, and what it lets go."""

import mmap

from kvtierd.buffers import BufferPool, huge_buffer

MiB = 1 << 20


def test_small_buffers_are_plain_and_never_kept():
    pool = BufferPool(64 * MiB)
    small = pool.take(64 << 10)
    assert type(small) is bytearray and len(small) == 64 << 10
    pool.give(small)
    assert pool.kept == 0 and pool.made == 0


def test_a_given_back_buffer_serves_the_next_frame_that_fits():
    pool = BufferPool(64 * MiB)
    a = pool.take(8 * MiB)
    assert isinstance(a, mmap.mmap) and len(a) >= 8 * MiB
    pool.give(a)
    assert pool.kept == len(a)
    assert pool.take(6 * MiB) is a           # the same mapping, warm
    assert pool.kept == 0 and pool.reused == 1
    pool.give(a)
    b = pool.take(1 * MiB)                   # too wasteful a fit (over 4x): a new one
    assert b is not a and pool.kept == len(a)


def test_the_pool_keeps_at_most_keep_bytes_dropping_the_smallest_first():
    pool = BufferPool(20 * MiB)
    bufs = [pool.take(n * MiB) for n in (2, 4, 8, 16)]
    for b in bufs:
        pool.give(b)
    assert sorted(len(b) for b in pool._free) == [16 * MiB]      # 2, 4 and 8 made room for 16
    pool.give(huge_buffer(4 * MiB))
    assert sorted(len(b) for b in pool._free) == [4 * MiB, 16 * MiB]
    pool.give(pool.take(32 * MiB))           # bigger than keep_bytes: not kept at all
    assert pool.kept <= 20 * MiB
    pool.resize(0)
    assert pool.kept == 0 and not pool._free


def test_the_pool_keeps_a_bounded_number_of_buffers():
    pool = BufferPool(1 << 40)
    for b in [pool.take(2 * MiB) for _ in range(BufferPool.MAX_KEPT + 10)]:
        pool.give(b)
    assert len(pool._free) == BufferPool.MAX_KEPT


def test_huge_buffers_are_whole_huge_pages():
    assert len(huge_buffer(3 * MiB)) == 4 * MiB
    assert len(huge_buffer(100)) == 100
