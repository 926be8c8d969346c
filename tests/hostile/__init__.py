"""Adversarial cases: faults, hostile inputs and other users, each with what the user gets."""
