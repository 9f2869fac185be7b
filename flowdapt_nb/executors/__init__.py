"""Executors: local (concurrent.futures), Dask and Ray, all on the one engine."""
