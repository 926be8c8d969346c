"""Serving engines and model libraries that load from the warm pool.

One module per engine or library (``vllm``, ``sglang``, ``transformers``), each importing
it only when called, so warmpool itself never depends on one. What the serving engines
share — which tier a rank's weights come from, and warming a cold model — is
:mod:`.weights`.
"""
