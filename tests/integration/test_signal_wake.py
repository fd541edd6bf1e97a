"""lorad_base/signalwake.py: a signal the kernel hands to another thread still wakes the main
thread's wait at once (the daemon's stop; tests/integration/test_daemon_lifecycle.py has the
daemon-level case). In-process, real signals; a socket pair, hence not in tests/unit."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from lorad_base.signalwake import SignalWake

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)


@pytest.fixture
def usr2_sets_event():
    event = threading.Event()
    previous = signal.signal(signal.SIGUSR2, lambda *_: event.set())
    yield event
    signal.signal(signal.SIGUSR2, previous)


def _signal_from_another_thread() -> threading.Thread:
    """SIGUSR2 sent to a helper thread itself: the C handler runs there, not in the main thread.
    Sent once the main thread is waiting (0.3 s on): sent earlier, the main thread would run the
    handler before it waits, and the test would pass without showing anything (never fail)."""

    def send() -> None:
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_a_signal_taken_by_another_thread_wakes_the_wait(usr2_sets_event):
    with SignalWake() as wake:
        started = time.monotonic()
        helper = _signal_from_another_thread()
        assert wake.wait(usr2_sets_event, 60) is True
        helper.join()
    # A plain Event.wait would sit out its 60 s: the main thread never took the signal.
    assert time.monotonic() - started < 30


def test_the_wait_times_out_and_restores_the_previous_wakeup_fd(usr2_sets_event):
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    with SignalWake() as wake:
        assert wake.wait(usr2_sets_event, 0.05) is False
    assert signal.set_wakeup_fd(before) == before


def test_off_the_main_thread_it_waits_in_slices():
    event, answers = threading.Event(), []

    def waiter():
        with SignalWake() as wake:  # set_wakeup_fd refuses other threads: the fallback
            answers.append(wake.wait(event, 60))

    thread = threading.Thread(target=waiter)
    thread.start()
    event.set()
    thread.join(30)
    assert answers == [True]
