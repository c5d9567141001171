"""kvtierd as a vLLM v1 KV connector: prompt prefixes shared across vLLM engines.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtierd.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": "/run/kvtierd/kvtierd.sock"}}'

`KVTierConnector` is resolved lazily (PEP 562): vLLM's getattr on this module
imports vLLM's connector base and refuses a vLLM release outside the tested
range (version.py) before any KV moves. The parts below need no vLLM, so
they can be tested and benchmarked where vLLM is not installed:
config (extra-config keys), naming (namespaces and keys), layout (KV tensors
-> blocks), link (daemon connection with bounded reconnects), plan
(scheduler -> worker messages), scheduler and worker (the two halves).
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVTierConnector", "KVTierMetadata", "KVTierStats"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import logging

    import vllm

    from kvtierd.integrations.vllm.version import check_version

    if not check_version(vllm.__version__):
        logging.getLogger("vllm.kvtierd").warning(
            "vLLM %s is outside kvtierd's tested range; running anyway because KVTIERD_VLLM_ALLOW_UNTESTED=1",
            vllm.__version__)
    from kvtierd.integrations.vllm import connector

    return getattr(connector, name)
