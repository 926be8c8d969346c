"""Loaders: how weights get from storage into one resident buffer."""
