"""Adapters between kvtierd and inference frameworks.

Each submodule imports its framework lazily, so importing kvtierd (or the
daemon) never pulls in torch or transformers. `cost` holds the load-versus-
recompute model the adapters share.
"""
