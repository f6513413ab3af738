"""Benchmarks (``make bench``). Each module measures tenantctl against a baseline in the same run."""
