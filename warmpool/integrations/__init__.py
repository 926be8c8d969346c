"""Serving engines and model libraries that load from the warm pool by naming it.

One module per engine (``vllm``, ``sglang``) or library (``transformers``), each importing
it only when it calls in, so warmpool itself never depends on one. What the engines share
— which tier a rank's weights come from, and warming a cold model — is :mod:`.weights`.
"""
