"""The client's reply spin: on while replies come within it, off when they do not, back on when they are fast again."""

from kvtierd.spin import SpinPolicy

LIMIT = 200e-6


def feed(p: SpinPolicy, wait_s: float, n: int) -> None:
    for _ in range(n):
        p.waited(wait_s)


def test_fast_replies_keep_the_spin():
    p = SpinPolicy(LIMIT)
    feed(p, 40e-6, 1000)
    assert p.spin_s == LIMIT


def test_one_stall_does_not_turn_the_spin_off():
    p = SpinPolicy(LIMIT)
    feed(p, 40e-6, 100)
    p.waited(0.05)              # a 50 ms stall (GC, preemption) counts as at most a few limits
    assert p.spin_s == LIMIT
    feed(p, 40e-6, 100)
    assert p.spin_s == LIMIT


def test_replies_slower_than_the_limit_stop_the_spin():
    p = SpinPolicy(LIMIT)
    feed(p, 1e-3, 50)           # eight clients on two cores: replies take a millisecond
    assert p.spin_s == 0.0


def test_a_client_that_stopped_spinning_starts_again_when_replies_are_fast():
    p = SpinPolicy(LIMIT)
    feed(p, 1e-3, 50)
    assert p.spin_s == 0.0
    # Measured while sleeping, a reply includes the wakeup: 60 us, still inside the limit.
    # (The old rule probed with an eighth of the limit, which such replies always missed.)
    feed(p, 60e-6, 40)
    assert p.spin_s == LIMIT


def test_a_zero_limit_never_spins():
    p = SpinPolicy(0.0)
    feed(p, 1e-6, 100)
    assert p.spin_s == 0.0
