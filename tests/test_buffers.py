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


def test_kept_buffers_nobody_took_for_idle_s_are_let_go_and_the_pool_says_when_to_look_again():
    armed = []
    pool = BufferPool(64 * MiB, idle_s=30.0, on_keep=lambda: armed.append(1))
    a, b = pool.take(4 * MiB), pool.take(8 * MiB)
    pool.give(a, now=100.0)
    assert armed == [1]                      # the pool keeps something again: arm a trim
    pool.give(b, now=110.0)
    assert armed == [1]                      # already keeping: no second timer
    assert pool.trim(now=120.0) == 10.0      # nothing idle yet; a is idle in 10 s
    assert pool.trim(now=131.0) == 9.0       # a let go; b in 9 s
    assert pool._free == [b] and pool.kept == len(b)
    assert pool.trim(now=140.0) is None      # b too: nothing kept, no more timer
    assert pool.kept == 0
    assert a.closed and b.closed
    c = pool.take(4 * MiB)                   # the next frame maps a new one
    assert c is not a and pool.made == 3
    pool.give(c, now=150.0)
    assert armed == [1, 1]


def test_a_buffer_taken_again_is_not_let_go_under_its_taker():
    pool = BufferPool(64 * MiB, idle_s=1.0)
    a = pool.take(4 * MiB)
    pool.give(a, now=0.0)
    assert pool.take(4 * MiB) is a           # in use again
    assert pool.trim(now=10.0) is None and not a.closed


def test_one_trim_unmaps_at_most_trim_bytes_and_asks_to_be_called_again_soon():
    pool = BufferPool(256 * MiB, idle_s=1.0)
    bufs = [pool.take(32 * MiB) for _ in range(4)]      # a burst's buffers, all idle at once
    for b in bufs:
        pool.give(b, now=0.0)
    assert pool.trim(now=5.0) == BufferPool.TRIM_AGAIN_S
    assert pool.let_go == 2 and pool.kept == 2 * len(bufs[0])
    assert pool.trim(now=5.1) is None and pool.let_go == 4 and pool.kept == 0
