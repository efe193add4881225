"""Dask graph builders: they create tasks, never compute them."""
