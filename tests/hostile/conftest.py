"""The controller harness of the controller tests, for the hostile cases that need one."""

from tests.test_controller import harness  # noqa: F401 - a fixture, used by name
