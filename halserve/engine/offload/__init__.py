"""KV offload tiers under the prefix cache: host memory, then the filesystem. One
implementation of the KV connector (``engine.kv_connector.OffloadConnector`` adapts it):
the scheduler, core and runner never import this package.

Every tier holds whole KV blocks keyed by their prefix-cache block hash, in one canonical,
backend-neutral layout: ``[layers, 2, block_size, kv_heads, head_dim]`` in the model dtype.
A block written by one backend (any ``kv_cache_shape`` layout) loads on another when the
model, dtype and block geometry match; the tier fingerprint says so.

- ``HostMemoryTier``: a fixed pool of host buffers (pinned where the HAL says so), LRU,
  layer-major so that the device can take a prompt's blocks a layer at a time.
- ``FileSystemTier``: one file per block under ``<dir>/<fingerprint>/``, LRU by mtime so the
  order survives restarts; a header (with a CRC32) and a payload checksum guard every
  file, writes are atomic
  (temp file + rename) and run on a background thread. A corrupt, truncated or mismatched
  file is a miss: it is removed and counted, and the block is recomputed.
- ``OffloadManager``: what the engine talks to. ``save`` copies newly committed device
  blocks down (write-through), ``lookup`` continues a device prefix hit through the tiers
  (disk reads run as a ``LoadJob`` on prefetch threads, copied to the device in batches
  as they land; the sequence waits while others keep running), and
  ``scatter`` copies found blocks into fresh device blocks through ``hal.swap_blocks``, a
  layer at a time on the HAL's copy stream, so the forward that reads them starts on
  layer 0 while the later layers are still crossing the bus.
- ``KVLayout``: converts between a backend's block layout and the canonical one. It learns
  the layout by writing known values through the backend's own ``write_kv``, so it needs no
  knowledge of any backend.

One idea a file: ``kvfile`` (the block file format as a reader needs it, and the reader
processes that run it as a script with the standard library and numpy alone),
``blockfile`` (the format on the engine's side), ``common`` (the tier interface, counters),
``host_tier``, ``fs_tier``, ``layout`` (the canonical layout), ``transfers`` (device <->
host copies, write-through), ``loadjob`` (a load job and its life), ``loads`` (lookups and
load jobs), ``manager`` (the thin part that owns the state, and ``build_offload``).
"""

from halserve.engine.offload import kvfile  # noqa: F401
from halserve.engine.offload.blockfile import (block_file_parts, block_rows, check_block_file,  # noqa: F401
                                               device_checksums, encode_block_file, header_parts,
                                               header_prefix)
from halserve.engine.offload.common import KVTier, TierStats, dtype_name, host_empty, tier_fingerprint  # noqa: F401
from halserve.engine.offload.fs_tier import FileSystemTier  # noqa: F401
from halserve.engine.offload.host_tier import HostMemoryTier  # noqa: F401
from halserve.engine.offload.kvfile import (FILE_SUFFIX, MAGIC, VERSION, BadBlockFile,  # noqa: F401
                                            checksum_weights, file_head, payload_checksum)
from halserve.engine.offload.layout import KVLayout  # noqa: F401
from halserve.engine.offload.loadjob import LoadJob, LookupResult  # noqa: F401
from halserve.engine.offload.manager import (LANDING_MAX_BYTES, OffloadManager, build_offload,  # noqa: F401
                                             landing_host_bytes)
