"""Which vLLM releases the connector is tested with, and the guard that refuses the rest.

vLLM has changed its KV cache layouts, its connector hooks and its block
hashing between minor releases without a deprecation period; a connector
written against one release can silently load K/V into the wrong places on
the next. So an untested version is refused at import with a message that
says what to do, unless the operator opts in explicitly
(KVTIERD_VLLM_ALLOW_UNTESTED=1), in which case a warning is logged.
"""

from __future__ import annotations

import os
import re

# Releases the CI runs the connector against (tests/vllm/). Keep in step with scripts/setup_vllm.sh.
TESTED_VERSIONS = ("0.32.0",)
# The supported range: same minor series as a tested release (patch releases keep the connector API).
SUPPORTED_MIN = (0, 32, 0)
SUPPORTED_BELOW = (0, 33, 0)
ALLOW_ENV = "KVTIERD_VLLM_ALLOW_UNTESTED"


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is outside the range the connector was tested with."""


def parse_version(v: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a vLLM version string such as '0.32.0+cpu' or '0.33.0rc1'."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", v)
    if not m:
        raise UnsupportedVLLMVersion(f"cannot parse the vLLM version {v!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def is_supported(v: str) -> bool:
    return SUPPORTED_MIN <= parse_version(v) < SUPPORTED_BELOW


def check_version(v: str, env: dict | None = None) -> bool:
    """True when `v` is supported; False when it is not but the operator allowed it;
    raises UnsupportedVLLMVersion otherwise."""
    if is_supported(v):
        return True
    env = os.environ if env is None else env
    if env.get(ALLOW_ENV, "") == "1":
        return False
    lo = ".".join(map(str, SUPPORTED_MIN))
    hi = ".".join(map(str, SUPPORTED_BELOW))
    raise UnsupportedVLLMVersion(
        f"kvtierd's vLLM connector supports vLLM >= {lo}, < {hi} (tested: {', '.join(TESTED_VERSIONS)}); "
        f"this is vLLM {v}. vLLM changes its KV cache layouts and connector API between releases, and a "
        f"mismatch would load K/V into the wrong places. Install a supported vLLM, upgrade kvtierd, or set "
        f"{ALLOW_ENV}=1 to try this version at your own risk (outputs may be wrong).")
