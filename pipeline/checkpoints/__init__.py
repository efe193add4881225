"""Checkpoint discovery and reading: the only place torch and safetensors are imported.

Importing this package does not import torch: the readers import it when a ``.pt`` file is
opened.
"""
