"""The block file format on the engine's side (torch tensors in, bytes out, and the checks
that name a bad file's fault). The reader side, with no torch, is ``kvfile``.
"""
from __future__ import annotations

import json
import logging
import math
import zlib

import numpy as np
import torch

from halserve.engine.offload import kvfile
from halserve.engine.offload.kvfile import MAGIC, VERSION, BadBlockFile, checksum_weights, file_head, payload_checksum
from halserve.engine.offload.kvfile import PREFIX as _PREFIX, TRAILER as _TRAILER
from halserve.engine.offload.common import dtype_name

logger = logging.getLogger("halserve")


def block_rows(block: "torch.Tensor | np.ndarray") -> np.ndarray:
    """A host block's bytes as ``[layers, layer_bytes]`` uint8, in file order, without a copy:
    each layer's piece is contiguous (a host-tier slot is strided between layers)."""
    if isinstance(block, torch.Tensor):
        t = block.reshape(block.shape[0], -1)  # a view: each layer's piece is contiguous
        if t.stride(-1) != 1:
            t = t.contiguous()
        return t.view(torch.uint8).numpy()
    return block


def device_checksums(words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``payload_checksum`` of n blocks at once on their device: ``words`` ``[layers, n,
    words a layer]`` int64, ``weights`` ``checksum_weights`` as int64 ``[layers, 1, ...]``;
    returns ``[n]`` int64 holding the checksums' bits (multiply-adds wrap mod 2**64)."""
    return words.mul(weights).sum(dim=(0, 2))


def _trailer(head: "bytes | bytearray", rows: np.ndarray) -> bytes:
    return _TRAILER.pack(zlib.crc32(head), payload_checksum(rows))


def block_file_parts(fingerprint: bytes, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]
                     ) -> tuple[bytes, np.ndarray, bytes]:
    """A block file as (head, payload rows, trailer): magic, version and JSON header; the
    block's bytes (``block_rows``, no copy); a CRC32 of the head and the payload's
    ``payload_checksum``."""
    head = file_head(header_prefix(fingerprint, h, block.dtype, tuple(block.shape)), tokens)
    rows = block_rows(block)
    return head, rows, _trailer(head, rows)


def encode_block_file(fingerprint: bytes, h: bytes, block: torch.Tensor, tokens: tuple[int, ...]) -> bytes:
    head, rows, trailer = block_file_parts(fingerprint, h, block.contiguous(), tokens)
    return head + rows.tobytes() + trailer


def header_parts(fingerprint: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """A block file's JSON header up to its tokens, before and after the block hash (hex):
    the one definition of the header's form, which ``block_file_parts`` writes and
    ``check_block_file`` compares without a JSON parse."""
    return (b'{"fingerprint":"%s","hash":"' % fingerprint.hex().encode(),
            b'","dtype":"%s","shape":[%s],"tokens":[' % (dtype_name(dtype).encode(), ",".join(map(str, shape)).encode()))


def header_prefix(fingerprint: bytes, h: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """``header_parts`` around the hash ``h``."""
    a, b = header_parts(fingerprint, dtype, shape)
    return a + h.hex().encode() + b


def check_block_file(head: "bytes | bytearray", rows: np.ndarray, trailer: "bytes | bytearray",
                     fingerprint: bytes, h: bytes, dtype: torch.dtype, shape: tuple[int, ...],
                     check_payload: bool = True) -> tuple[tuple[int, ...], int]:
    """Check a block file split into head / payload rows / trailer; returns the block's
    tokens and its payload checksum, or raises BadBlockFile naming the first problem.
    ``check_payload=False`` leaves the payload to the caller (checked where it is copied
    to, e.g. on the device)."""
    if len(head) < _PREFIX.size:
        raise BadBlockFile(f"truncated: {len(head)}-byte head")
    magic, version, hlen = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise BadBlockFile(f"bad magic {magic!r}")
    if version != VERSION:
        raise BadBlockFile(f"version {version}, expected {VERSION}")
    nbytes = math.prod(shape) * dtype.itemsize
    if len(head) != _PREFIX.size + hlen or rows.nbytes != nbytes or len(trailer) != _TRAILER.size:
        raise BadBlockFile(f"size {len(head) + rows.nbytes + len(trailer)} does not match header length "
                           f"{hlen} + payload {nbytes}")
    head_crc, payload_sum = _TRAILER.unpack(trailer)
    if zlib.crc32(head) != head_crc:
        raise BadBlockFile("header checksum mismatch")
    if check_payload and payload_checksum(rows) != payload_sum:
        raise BadBlockFile("payload checksum mismatch")
    raw = bytes(head[_PREFIX.size:])
    pre = header_prefix(fingerprint, h, dtype, shape)
    if raw.startswith(pre) and raw.endswith(b"]}"):  # the usual case, without a JSON parse
        body = raw[len(pre):-2]
        try:
            return (tuple(map(int, body.split(b","))) if body else ()), payload_sum
        except ValueError:
            pass  # the full parse below says what is wrong
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise BadBlockFile(f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise BadBlockFile("the header is not an object")
    if header.get("fingerprint") != fingerprint.hex():
        raise BadBlockFile("fingerprint mismatch (other model, dtype or block geometry)")
    if header.get("hash") != h.hex():
        raise BadBlockFile("block hash mismatch")
    if header.get("dtype") != dtype_name(dtype) or tuple(header.get("shape", ())) != tuple(shape):
        raise BadBlockFile(f"dtype/shape {header.get('dtype')}{header.get('shape')} != {dtype_name(dtype)}{list(shape)}")
    try:
        return tuple(int(t) for t in header.get("tokens", ())), payload_sum
    except (TypeError, ValueError):
        raise BadBlockFile("unreadable tokens in the header") from None
