"""A model folder's weights checked the first time it is loaded, then trusted while its files stay
the same files.

OpenAI's layout is checked by every tensor's CRC32C (tf_checkpoint.verify, on every core).
HuggingFace's carries no checksum: a safetensors file is checked against the sha256 the hub
announced where that is known (recorded by a download from the hub, or the name of the blob a
hub cache's snapshot links to), and by its structure otherwise (its header describes the file
exactly: safetensors.read_header).

What passed is recorded in a stamp, `.picogpt-verified`, JSON {"files": {name: entry}}: each
file's size, mtime and inode when it was checked, and how it was. A load whose weights files all
match their entries skips the check; a file that changed is checked again. A folder picogpt does
not write into (a model inside the installed package, a folder it may not write) keeps its stamp
in the weights folder instead, `<weights>/.verified/<hash of the folder's path>.json`. A download
writes the same stamp, its entries covering the tokenizer files it checked too (download.py).
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from picogpt import files
from picogpt.errors import ModelError, PicogptError
from picogpt.formats import hf, safetensors, tf_checkpoint
from picogpt.hub import sources
from picogpt.hub.transfer import file_digest

STAMP = ".picogpt-verified"
STAMPS = ".verified"  # in the weights folder: the stamps of folders picogpt does not write into
STAMP_LIMIT = files.MB
PACKAGE = Path(__file__).resolve().parents[1]  # picogpt's own files: never written into
IDENTITY = ("size", "mtime_ns", "inode")


class Checked(NamedTuple):
    """One weights file checked: how ("crc32c", "sha256" or "structure"), and in words."""

    path: Path
    how: str
    said: str


# --- the stamp --------------------------------------------------------------------------------


def identity(path):
    """What says a file is still the file that was checked: its size, mtime and inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def unchanged(folder, name, entry):
    """Whether file `name` of `folder` is still the file the stamp's `entry` records."""
    try:
        now = identity(Path(folder) / name)
    except OSError:
        return False
    return isinstance(entry, dict) and all(entry.get(key) == now[key] for key in IDENTITY)


def stamp_path(folder):
    """Where the folder's stamp is: in it, when picogpt writes into it; else in the weights
    folder, named by a hash of its path (recorded only where a weights folder exists: running
    the bundled model creates none)."""
    folder = Path(folder)
    resolved = folder.resolve()
    inside_package = resolved == PACKAGE or PACKAGE in resolved.parents
    if not inside_package and os.access(folder, os.W_OK):
        return folder / STAMP
    key = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return sources.weights_dir() / STAMPS / f"{key}.json"


def read_stamp(folder):
    """{file name: entry} of the folder's stamp; {} when there is none, or one of another form
    (an older picogpt's: its files are then checked again, once)."""
    try:
        stamp = files.load_json(stamp_path(folder), STAMP_LIMIT, "verification stamp")
    except (PicogptError, OSError):
        return {}
    entries = stamp.get("files") if isinstance(stamp, dict) else None
    return entries if isinstance(entries, dict) else {}


def record(folder, checked):
    """Add `checked` ({file name: entry, with the file's identity from before it was checked})
    to the folder's stamp, keeping the entries of files unchanged since. False when the stamp
    cannot be written: it is a shortcut only, and the files are checked again next time."""
    folder = Path(folder)
    entries = {n: e for n, e in read_stamp(folder).items() if unchanged(folder, n, e)}
    return _write(folder, {**entries, **checked})


def forget(folder, names):
    """Drop the stamp's entries of `names` (files that just failed their check)."""
    entries = read_stamp(folder)
    if any(name in entries for name in names):
        _write(folder, {n: e for n, e in entries.items() if n not in names})


def _write(folder, entries):
    """Write the folder's stamp, atomically; False when it cannot be."""
    path = stamp_path(folder)
    try:
        path.parent.mkdir(exist_ok=True)  # the weights folder's .verified; never the folder
        files.atomic_write(path, json.dumps({"folder": str(folder.resolve()), "files": entries},
                                            indent=1, sort_keys=True))
    except OSError:
        return False
    return True


# --- checking ---------------------------------------------------------------------------------


def verify_once(folder):
    """Check the folder's weights unless its stamp says they passed and are the same files
    since (what loading a folder does). True when they were checked now."""
    folder = Path(folder)
    stamp = read_stamp(folder)
    try:
        names = _stamped_weights(folder, stamp)
    except (PicogptError, OSError):
        names = []  # the check says what is wrong
    if names and all(unchanged(folder, name, stamp.get(name)) for name in names):
        return False
    check(folder)
    return True


def _stamped_weights(folder, stamp):
    """The names of the folder's weights files as its stamp knows them ([] when it does not)."""
    if hf.is_hf_folder(folder):
        return _hf_names(*hf.weight_files(folder))
    index = Path(f"{tf_checkpoint.resolve_prefix(folder)}.index").name
    entry = stamp.get(index)
    shards = entry.get("shards") if isinstance(entry, dict) else None  # recorded with the index
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        return []
    return [index, *shards]


def _hf_names(paths, weight_map):
    return [p.name for p in paths] + ([hf.INDEX] if weight_map is not None else [])


def check(folder, digests=None):
    """Check the folder's weights now, whatever its stamp says, and record what passed: a list
    of `Checked`, one per weights file. A failure is a PicogptError naming the file (and, for a
    CRC32C, the tensor); the failed files' entries leave the stamp. `digests` ({name: sha256})
    are the sha256s a download checked as the files arrived: recorded, not computed again."""
    folder = Path(folder)
    if hf.is_hf_folder(folder):
        return _check_hf(folder, digests or {})
    return _check_openai(folder)


def _check_openai(folder):
    prefix = tf_checkpoint.resolve_prefix(folder)
    # Identities from before the check: a file that changes while it is read is checked again.
    before = {p.name: identity(p) for p in [Path(f"{prefix}.index"),
                                            *folder.glob(f"{prefix.name}.data-*")]}
    try:
        shards = {path.name: n for path, n in tf_checkpoint.verify(folder).items()}
    except PicogptError:
        forget(folder, list(before))
        raise
    index = f"{prefix.name}.index"
    entries = {index: {**before[index], "check": "crc32c", "shards": sorted(shards)}}
    for name, n in shards.items():
        entries[name] = {**(before.get(name) or identity(folder / name)), "check": "crc32c",
                         "tensors": n}
    record(folder, entries)
    return [Checked(folder / name, "crc32c", f"{n} tensors, each matches its CRC32C")
            for name, n in sorted(shards.items())]


def _check_hf(folder, digests):
    paths, weight_map = hf.weight_files(folder)
    names = _hf_names(paths, weight_map)
    before = {name: identity(folder / name) for name in names}
    stamp = read_stamp(folder)
    entries, results = {}, []
    if weight_map is not None:
        entries[hf.INDEX] = {**before[hf.INDEX], "check": "structure"}
    try:
        for path in paths:
            entry, said = _check_safetensors(path, stamp.get(path.name), digests.get(path.name))
            entries[path.name] = {**before[path.name], **entry}
            results.append(Checked(path, entry["check"], said))
    except PicogptError:
        forget(folder, names)
        raise
    record(folder, entries)
    return results


def _check_safetensors(path, entry, digest):
    """({"check": how, "sha256": ...}, in words) for one safetensors file, checked."""
    safetensors.read_header(path)  # every tensor inside the file, no holes, no overlaps
    if digest:
        return {"check": "sha256", "sha256": digest}, "matches the sha256 the hub announced"
    expected, source = _known_sha256(path, entry)
    if expected is None:
        return {"check": "structure"}, ("its header describes the file exactly (a safetensors "
                                        "file carries no checksum, and no sha256 is known for "
                                        "this one)")
    got = file_digest(path, "sha256")
    if got != expected:
        raise ModelError(f"{path}: its sha256 is {got}, but {source} says {expected}: the file "
                         "is damaged or was replaced")
    return {"check": "sha256", "sha256": expected}, f"matches the sha256 {source} says"


def _known_sha256(path, entry):
    """(sha256, where it is from) of what the file should be, or (None, None)."""
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    if isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded):
        return recorded, "the hub (recorded when it was downloaded)"
    target = Path(os.path.realpath(path))  # a hub cache names each large file's blob by it
    if path.is_symlink() and target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}",
                                                                             target.name):
        return target.name, "the name of its blob in the hub's cache"
    return None, None
