"""Lethe's HTTP service and ledger. Nothing in this package imports torch."""
