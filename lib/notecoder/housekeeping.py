"""Keeping an output to one run: replacing a run, and clearing stray parts.

Reading an output: the committed parts are the ones that have a commit marker
(:meth:`OutputLayout.committed_parts`), and that is the way to read an output at any
time, even while a run is still writing it. A part without a marker is a stray: the
work of an attempt that died between writing the part and its marker, or of a shard
that failed on every attempt. The driver deletes strays when it finishes (after its
engines are gone), so once a run has ended a plain glob of ``part-*.parquet`` reads
the same rows; after a driver that was killed, strays stay until the next run ends.

Replacing a run (``--new-run``): the old run's record (run.json, summary.json and the
commit markers) moves to ``_notecoder/previous/<old run id>/`` with a note of what
was deleted, and its parts are deleted, so the new run never mixes with the old one
and the audit trail of the old one stays. Parts are deleted rather than kept beside
it because a reader that globs the output recursively would count them again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from notecoder.commit import META_DIR, OutputLayout
from notecoder.storage import join, relative_to

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
# Local writes go through ".tmp-<uuid>-<name>"; one killed mid-write leaves it behind.
LOCAL_TMP_PREFIX = ".tmp-"


def part_files(layout: OutputLayout) -> dict[str, str]:
    """Every part file at the top of the output, by shard id, committed or not."""
    found = {}
    for entry in layout.storage.list_files(layout.uri, suffix=PART_SUFFIX):
        name = relative_to(entry.uri, layout.uri)
        if "/" not in name and name.startswith(PART_PREFIX):
            found[name[len(PART_PREFIX) : -len(PART_SUFFIX)]] = entry.uri
    return found


def _leftover_temp_files(layout: OutputLayout) -> list[str]:
    found = []
    for entry in layout.storage.list_files(layout.uri, hidden=True):
        name = relative_to(entry.uri, layout.uri)
        if "/" not in name and name.startswith(LOCAL_TMP_PREFIX):
            found.append(entry.uri)
    return found


def remove_strays(layout: OutputLayout) -> int:
    """Delete parts without a commit marker, and leftover temporary files.

    Call only when no engine can still be writing to the output. Any marker file
    protects its part, even one of a shard outside the current plan.
    """
    markers = {
        relative_to(e.uri, layout.markers_dir).removesuffix(".json")
        for e in layout.storage.list_files(layout.markers_dir, suffix=".json")
    }
    strays = [uri for sid, uri in part_files(layout).items() if sid not in markers]
    strays += _leftover_temp_files(layout)
    for uri in strays:
        layout.storage.delete(uri)
    if strays:
        log.info("removed %d stray part files (no commit marker)", len(strays))
    return len(strays)


def archive_run(layout: OutputLayout, manifest: dict[str, Any]) -> dict[str, int]:
    """Retire the run recorded in the output so a new one can start there.

    The order makes an interruption harmless: records are copied first, markers
    deleted before parts (so nothing counts as committed without its part), and
    run.json last, so until the end the old run is still the one in place and the
    same --new-run command can simply be run again.
    """
    storage = layout.storage
    run_id = str(manifest.get("run_id", "unknown"))
    meta = join(layout.uri, META_DIR)
    dest = join(meta, "previous", run_id)
    records = {
        relative_to(e.uri, meta): e.uri
        for e in storage.list_files(meta, hidden=True)
        if not relative_to(e.uri, meta).startswith("previous/")
    }
    parts = part_files(layout)
    for rel, uri in sorted(records.items()):
        storage.copy(uri, join(dest, rel))
    layout.write_json(
        join(dest, "replaced.json"),
        {
            "replaced_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parts_deleted": sorted(f"part-{sid}.parquet" for sid in parts),
        },
    )
    markers = [uri for rel, uri in records.items() if rel.startswith("shards/")]
    for uri in markers:
        storage.delete(uri)
    for uri in parts.values():
        storage.delete(uri)
    for rel, uri in records.items():
        if not rel.startswith("shards/") and rel != "run.json":
            storage.delete(uri)
    storage.delete(layout.run_file)
    counts = {"markers": len(markers), "parts": len(parts), "records": len(records)}
    log.info(
        "new run: moved run %s's record (%d markers) to %s and deleted its %d parts",
        run_id,
        counts["markers"],
        dest,
        counts["parts"],
    )
    return counts
