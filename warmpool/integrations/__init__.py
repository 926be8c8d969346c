"""Serving engines and model libraries that load from the warm pool."""
