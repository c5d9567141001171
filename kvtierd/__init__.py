"""kvtierd: a tiered KV-cache store (HBM, shared host memory, NVMe) for LLM inference workers."""

__version__ = "0.1.0"

__all__ = ["Client", "AsyncClient", "KvtierdError", "StoreFull", "ConnectionLost", "__version__"]


def __getattr__(name: str):
    # Lazy, so `kvtierd serve` does not import the client (and nothing imports torch).
    if name in ("Client", "AsyncClient", "KvtierdError", "StoreFull", "ConnectionLost"):
        from kvtierd import client
        return getattr(client, name)
    raise AttributeError(name)
