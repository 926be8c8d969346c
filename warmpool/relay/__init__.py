"""Relays: upload notifications from real object stores, into the controller's stream.

No object store writes to Redis. AWS S3 notifies an SQS queue (directly or through SNS),
GCS a Pub/Sub topic (pushed to an HTTPS endpoint), MinIO and Ceph RGW a webhook. A relay
takes each notification from there, checks it with the controller's own parser, and
adds it to the stream ``<prefix>:requests`` before acknowledging it to the sender — so
a notification is lost neither while no controller runs (the stream keeps it) nor when
the relay dies (the sender still has it). Repeats are harmless: the controller debounces
uploads and identifies models by content hash.

- :mod:`.sink`: validate, XADD, dead-letter (shared by every relay).
- :mod:`.sqs`: long-polls a queue (``warmpool relay sqs``).
- :mod:`.http`: the webhook endpoint (``warmpool relay http``).
- :mod:`.spec`: a relay's settings (CLI flags or the config file's ``relays:`` list).
"""
