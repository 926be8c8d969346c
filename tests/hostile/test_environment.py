"""The streamer's settings travel through ``os.environ``: other threads must never see
it emptied, and streams with the same settings must not queue behind each other."""

from __future__ import annotations

import os
import threading

import pytest

from warmpool.loading.environ import StreamerEnvironment

WAIT_S = 30.0  # a deadlock bound, not a speed assertion


def test_a_variable_another_thread_sets_during_a_stream_is_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The user gets: a variable their code sets while a model streams (a token, a
    proxy) still set afterwards; the environment is never emptied or rolled back."""
    monkeypatch.delenv("WARMPOOL_TEST_SET_MEANWHILE", raising=False)
    gate = StreamerEnvironment()
    seen_path = []
    with gate.holding({**os.environ, "RUNAI_STREAMER_CONCURRENCY": "3"}):
        def other() -> None:
            seen_path.append(os.environ.get("PATH"))
            os.environ["WARMPOOL_TEST_SET_MEANWHILE"] = "1"
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(WAIT_S)
    assert seen_path == [os.environ["PATH"]]
    assert os.environ.get("WARMPOOL_TEST_SET_MEANWHILE") == "1"
    monkeypatch.delenv("WARMPOOL_TEST_SET_MEANWHILE")


def test_only_the_changed_keys_are_set_then_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user gets: their own ``RUNAI_STREAMER_*`` values back after a stream, and no
    variable left behind that they did not set."""
    monkeypatch.setenv("RUNAI_STREAMER_CONCURRENCY", "8")
    monkeypatch.delenv("RUNAI_STREAMER_MEMORY_LIMIT", raising=False)
    gate = StreamerEnvironment()
    before = dict(os.environ)
    wanted = {"RUNAI_STREAMER_CONCURRENCY": "2", "RUNAI_STREAMER_MEMORY_LIMIT": "1024"}
    with gate.holding({**before, **wanted}):
        assert {k: os.environ.get(k) for k in wanted} == wanted
        assert gate.base() == before  # what the next run's settings start from
    assert dict(os.environ) == before


def test_streams_with_the_same_settings_run_at_once() -> None:
    """The user gets: two models streaming together, not one after the other."""
    gate = StreamerEnvironment()
    env = {**os.environ, "RUNAI_STREAMER_CONCURRENCY": "5"}
    second_in = threading.Event()

    def second() -> None:
        with gate.holding(env):
            second_in.set()

    with gate.holding(env):
        thread = threading.Thread(target=second)
        thread.start()
        assert second_in.wait(WAIT_S), "the second stream waited for the first"
    thread.join(WAIT_S)


def test_a_stream_with_other_settings_waits_and_gets_its_own() -> None:
    """The user gets: each stream runs with its own settings, never a mix of two."""
    gate = StreamerEnvironment()
    seen: list[str | None] = []
    first_out = threading.Event()

    def second() -> None:
        with gate.holding({**os.environ, "RUNAI_STREAMER_CONCURRENCY": "7"}):
            seen.append(os.environ.get("RUNAI_STREAMER_CONCURRENCY"))
            seen.append("after" if first_out.is_set() else "during")

    with gate.holding({**os.environ, "RUNAI_STREAMER_CONCURRENCY": "6"}):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.2)  # give it the chance to barge in
        assert os.environ.get("RUNAI_STREAMER_CONCURRENCY") == "6"
        first_out.set()
    thread.join(WAIT_S)
    assert seen == ["7", "after"]
