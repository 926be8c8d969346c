"""The process environment that runai-model-streamer reads its settings from.

The streamer takes no settings object: its native library reads ``RUNAI_STREAMER_*`` and
the storage variables from the environment when it opens and when a request starts. So a
run sets the few variables whose values differ, and only those; runs that want the same
values share them (a node streams many models at once), a run that wants other values
waits until the runs holding the current ones end, and the last one out puts the
operator's values back. Nothing ever empties the environment, so a thread reading
another variable meanwhile (a storage client's credentials) never sees it missing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class StreamerEnvironment:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._users = 0
        self._waiting = 0
        self._saved: dict[str, str | None] = {}  # the operator's values of what we set

    def base(self) -> dict[str, str]:
        """The environment as the operator set it (what a run's settings start from)."""
        with self._changed:
            env = dict(os.environ)
            for key, value in self._saved.items():
                if value is None:
                    env.pop(key, None)
                else:
                    env[key] = value
            return env

    @contextmanager
    def holding(self, env: Mapping[str, str]) -> Iterator[None]:
        """Hold ``env``'s values in ``os.environ`` for the block."""
        with self._changed:
            self._waiting += 1
            try:
                # Runs that agree share; a run that disagrees waits for the holders to end
                # (and newcomers queue behind it, so it is not starved).
                while self._users and (self._waiting > 1 or not self._agrees(env)):
                    self._changed.wait()
            finally:
                self._waiting -= 1
            for key, value in env.items():
                if os.environ.get(key) != value:
                    self._saved.setdefault(key, os.environ.get(key))
                    os.environ[key] = value
            self._users += 1
        try:
            yield
        finally:
            with self._changed:
                self._users -= 1
                if not self._users:
                    self._restore()
                self._changed.notify_all()

    @staticmethod
    def _agrees(env: Mapping[str, str]) -> bool:
        return all(os.environ.get(key) == value for key, value in env.items())

    def _restore(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved.clear()


#: The one instance of the process: the environment is per process.
STREAMER_ENVIRONMENT = StreamerEnvironment()
