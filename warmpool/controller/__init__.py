"""The node controller: Redis events in, warm models out."""
