"""Metered usage per tenant (admin API) and control-plane metrics fed from the catalog."""
