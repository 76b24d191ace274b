"""The files of one checkpoint directory: names, the manifest (what wrote it, the size and CRC32 of
every file) and its verification, on one rank or split over all ranks."""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Optional

import torch
import torch.distributed as dist

from megatron.remoe import __version__
from megatron.remoe.compat import mcore_version_string, reads_checkpoint_of, writes_common_pt
from megatron.remoe.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"


MANIFEST = "checkpoint_manifest.json"


COMMON_PT = "common.pt"  # megatron-core < 0.19's file of the common state (compat.writes_common_pt)


CHECKPOINT_VERSION = 1


ITER_DIR_RE = re.compile(r"^iter_(\d{7})$")


TMP_DIR_RE = re.compile(r"^iter_(\d{7})\.(tmp|deleting)$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_files(directory: str) -> list:
    """Relative paths of the regular files under `directory`, sorted."""
    out = []
    for base, _, files in os.walk(directory):
        for name in files:
            out.append(os.path.relpath(os.path.join(base, name), directory))
    return sorted(out)


def _crc32(path: str, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def my_share(names: list) -> list:
    """This rank's part of a file list (round robin): ranks hash/verify in parallel."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return names[this_rank()::world]


def describe_files(directory: str, names: list, checksums: bool) -> dict:
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        out[name] = {"size": os.path.getsize(path)}
        if checksums:
            out[name]["crc32"] = _crc32(path)
    return out


def all_gather_dicts(mine: dict) -> dict:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def verify_checkpoint(path: str, checksums: bool = True, names: Optional[list] = None
                      ) -> Optional[str]:
    """None if the files of checkpoint `path` match its manifest, else what is wrong.

    `names`: verify only these manifest entries (a rank's share); the manifest itself is always
    read. Without a manifest (a checkpoint from an earlier version) nothing can be checked: None.
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        return f"{manifest_path} is unreadable ({type(e).__name__})"
    for name in (sorted(files) if names is None else names):
        want = files[name]
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != want.get("size"):
            return f"{full} has {size} bytes, {want.get('size')} were written"
        if checksums and want.get("crc32") and _crc32(full) != want["crc32"]:
            return f"{full} does not match its CRC32 recorded at save time"
    return None


def _manifest_names(path: str) -> list:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            return sorted(json.load(fh)["files"])
    except Exception:  # noqa: BLE001 -- verify_checkpoint reports it
        return []


def verify_checkpoint_distributed(path: str, checksums: bool = True) -> Optional[str]:
    """verify_checkpoint with the files split over all ranks; every rank gets the same answer."""
    names = _manifest_names(path)
    reason = verify_checkpoint(path, checksums, my_share(names)) if names else \
        verify_checkpoint(path, checksums)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def writer_versions() -> dict:
    """What wrote a checkpoint, recorded in its manifest (plain JSON, readable by any version)."""

    return {"megatron_core": mcore_version_string(), "torch": torch.__version__.split("+")[0],
            "megatron_remoe": __version__}


def check_writer_version(path: str) -> None:
    """ConfigError (one line) when checkpoint `path` was written by a newer megatron-core release
    than the installed one, which may not read its layout (0.19 moved the common state out of
    common.pt): say so, instead of failing to read it and calling it corrupt."""
    writer = None
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            writer = (json.load(fh).get("writer") or {}).get("megatron_core")
    except (OSError, ValueError, AttributeError):
        pass  # no or unreadable manifest: verify_checkpoint reports it
    if writer is None and writes_common_pt() and \
            os.path.isfile(os.path.join(path, "metadata.json")) and \
            not os.path.isfile(os.path.join(path, COMMON_PT)):
        writer = ">= 0.19"  # written before versions were recorded, in 0.19's layout
    if writer is None or (writer[0].isdigit() and reads_checkpoint_of(writer)):
        return
    raise ConfigError(
        f"checkpoint {path} was written by megatron-core {writer}, newer than the installed "
        f"{mcore_version_string()}, which cannot read its layout; fix: install megatron-core "
        f"{writer.lstrip('>= ')} or newer (within megatron-remoe's supported range), or load a "
        f"checkpoint written by {mcore_version_string()} or older")
