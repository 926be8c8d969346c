"""Fixtures shared by the whole suite live in plugin modules, listed here."""

pytest_plugins = ["tests.redis_server", "tests.pool_env", "tests.servers",
                  "tests.controller_harness"]
