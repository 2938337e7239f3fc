"""Bytes in and out: a tiny storage interface and the checkpoint format built on it."""
