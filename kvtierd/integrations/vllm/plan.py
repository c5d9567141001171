"""What the scheduler tells the workers each step: which blocks to load and which to save.

Plain dataclasses (pickled by vLLM from the EngineCore process to every worker).
Block ids are vLLM's; a chunk is one kvtierd block = G consecutive vLLM blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Transfer:
    """Chunks of one request: keys[i] names vLLM blocks block_ids[i*G:(i+1)*G]."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class StepPlan:
    namespace_base: str = ""
    block_bytes: int = 0          # per rank, as the scheduler computed it from the KV cache spec
    page_bytes: int = 0           # one layer's page (one vLLM block)
    chunk_tokens: int = 0
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    # requests whose blocks the scheduler holds until the workers report their saves done
    delayed: list[str] = field(default_factory=list)
