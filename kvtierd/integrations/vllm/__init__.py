"""kvtierd as a vLLM v1 KV connector: prompt prefixes shared across vLLM engines.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtierd.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket": "/run/kvtierd/kvtierd.sock"}}'

Importing this package imports vLLM and refuses a vLLM release outside the
tested range (version.py) before any KV moves. Modules: config (extra-config
keys), naming (namespaces and keys), layout (KV tensors -> blocks), link
(daemon connection with bounded reconnects), plan (scheduler -> worker
messages), scheduler and worker (the two halves), connector (the vLLM class).
"""

from kvtierd.integrations.vllm.version import check_version

import vllm as _vllm

if not check_version(_vllm.__version__):
    import logging

    logging.getLogger("vllm.kvtierd").warning(
        "vLLM %s is outside kvtierd's tested range; running anyway because KVTIERD_VLLM_ALLOW_UNTESTED=1",
        _vllm.__version__)

from kvtierd.integrations.vllm.connector import KVTierConnector, KVTierMetadata, KVTierStats  # noqa: E402

__all__ = ["KVTierConnector", "KVTierMetadata", "KVTierStats"]
