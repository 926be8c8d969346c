"""Fixtures shared by the whole suite live in plugin modules, listed here.

``make test`` runs the engine tests (:data:`ENGINE_TESTS`: vLLM and SGLang, two ranks
each) in one pytest process and everything else in another, at the same time (the
Makefile says how); each starts its own servers on free ports.
"""

pytest_plugins = ["tests.redis_server", "tests.pool_env", "tests.servers",
                  "tests.controller_harness"]

#: The modules whose tests start serving engines (the Makefile's ENGINE_TESTS).
ENGINE_TESTS = ("tests/test_vllm.py", "tests/test_vllm_zero_copy.py",
                "tests/test_vllm_export.py", "tests/test_sglang.py")
