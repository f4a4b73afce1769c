"""The output layout and the shard commit protocol.

    OUTPUT/
      part-<shard>.parquet          the coded rows of one shard
      _notecoder/run.json           the run's identity and audit record
      _notecoder/shards/<id>.json   one commit marker per shard, with its tally
      _notecoder/summary.json       the run's totals

A shard is committed when its marker exists, and its marker is written only after its
part file is complete. A part without a marker is an interrupted attempt: it is
overwritten when the shard is coded again, and readers should trust only parts that
have a marker (``committed_parts``).
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from notecoder.storage import Storage, join
from notecoder.tally import ShardTally

log = logging.getLogger(__name__)

META_DIR = "_notecoder"


class OutputLayout:
    """Where each piece of a run's output lives."""

    def __init__(self, storage: Storage, uri: str):
        self.storage = storage
        self.uri = uri

    def part(self, shard_id: str) -> str:
        return join(self.uri, f"part-{shard_id}.parquet")

    def marker(self, shard_id: str) -> str:
        return join(self.uri, META_DIR, "shards", f"{shard_id}.json")

    @property
    def markers_dir(self) -> str:
        return join(self.uri, META_DIR, "shards")

    @property
    def run_file(self) -> str:
        return join(self.uri, META_DIR, "run.json")

    @property
    def summary_file(self) -> str:
        return join(self.uri, META_DIR, "summary.json")

    def read_json(self, uri: str) -> dict[str, Any] | None:
        if not self.storage.exists(uri):
            return None
        return json.loads(self.storage.read_bytes(uri))

    def write_json(self, uri: str, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True, default=str)
        self.storage.write_bytes(uri, text.encode() + b"\n")

    def committed(self) -> dict[str, ShardTally]:
        """Tallies of every committed shard, by shard id.

        A marker whose part file is gone (deleted by hand) does not count: its shard
        is coded again rather than missing from the output unnoticed.
        """
        parts = {
            e.uri.rsplit("/", 1)[-1]
            for e in self.storage.list_files(self.uri, suffix=".parquet")
        }
        found = {}
        for entry in self.storage.list_files(self.markers_dir, suffix=".json"):
            data = json.loads(self.storage.read_bytes(entry.uri))
            tally = ShardTally.from_dict(data["tally"])
            if data.get("part", f"part-{tally.shard_id}.parquet") not in parts:
                log.warning("shard %s has a marker but no part", tally.shard_id)
                continue
            found[tally.shard_id] = tally
        return found

    def write_part(self, table: pa.Table, shard_id: str) -> None:
        """Write a shard's part file whole (it is not committed until its marker)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.storage.write_bytes(self.part(shard_id), buf.getvalue())

    def write_marker(self, tally: ShardTally, run_id: str) -> None:
        """Commit a shard whose part is already written."""
        marker = {
            "run_id": run_id,
            "part": f"part-{tally.shard_id}.parquet",
            "rows": tally.rows,
            "tally": tally.to_dict(),
        }
        self.write_json(self.marker(tally.shard_id), marker)

    def committed_parts(self) -> list[str]:
        """URIs of the part files that have a commit marker."""
        return [self.part(shard_id) for shard_id in sorted(self.committed())]
