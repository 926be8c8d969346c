"""Serving engines load from the pool by naming it.

One module per engine (``vllm``, ``sglang``), each importing its engine only when the
engine calls it, so warmpool itself never depends on an engine. What they share — which
tier a rank's weights come from, and warming a cold model — is :mod:`.weights`.
"""
