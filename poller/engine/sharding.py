"""Horizontal scale: N pollers split the organizations between them by a stable hash of the id.

Shard ``K/N`` (K from 1 to N) owns the organizations whose id hashes to K. The hash is CRC-32
of the decimal id: the same in every process, on every machine and Python version (Python's
``hash()`` is salted per process for strings, so replicas would disagree), and it spreads
sequential ids evenly. Every organization belongs to exactly one shard, so N replicas with
the same N never both alert for it; replicas briefly running with different N (during a
rollout) may overlap, which the store's guarded writes and exclusive delivery claims already
make harmless: one notification per breach, sent once.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
MAX_SHARDS = 1024


@dataclass(frozen=True, slots=True)
class Shard:
    index: int  # 1-based: "2/3" is the second of three
    count: int

    def owns(self, org_id: int) -> bool:
        return zlib.crc32(str(org_id).encode("ascii")) % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"K/N"`` with 1 <= K <= N; raises ValueError with a one-line message."""
    match = _SHARD.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not K/N (e.g. 2/3: the second of three shards)")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"the number of shards must be 1..{MAX_SHARDS} (got {count})")
    if not 1 <= index <= count:
        raise ValueError(f"the shard number must be 1..{count} (got {index})")
    return Shard(index, count)
