"""Simulation, apart from the product: realistic sender payloads (used by the tests and the
benchmarks) and `coldmail-webhooks simulate`, signed traffic against a running service."""
