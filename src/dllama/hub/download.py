"""`dllama download`: files from the Hugging Face Hub into the standard Hugging Face cache.

huggingface_hub does the talking: `HfApi.model_info` (file list, sizes, LFS sha256, gated flag),
`get_hf_file_metadata` (the resolve HEAD: ETag, commit, size, redirect; raises `GatedRepoError`), `http_get`
(the GET with Range, retries and the tqdm progress bar); `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE` and `HF_TOKEN`
are honoured by it. We drive those pieces ourselves instead of calling `hf_hub_download` because since
huggingface_hub 1.x (PR #4228) `hf_hub_download` writes each attempt to a process-unique temporary file that it
deletes on failure, so a download killed half-way starts over from byte 0. Here the partial blob keeps a stable
name (`blobs/<sha256>.incomplete`, under the same lock file hf_hub_download uses), the next run resumes it with a
Range request, and the result is put into the cache layout hf_hub_download reads (`blobs/`, `snapshots/<commit>/`,
`refs/<revision>`), so `try_to_load_from_cache` and `scan_cache_dir` see it.

Every file is checked against the hub's sha256 (LFS files) or git blob sha1 (small files) after download, and
again when `dllama download` finds it already in the cache: a corrupted file is deleted and downloaded again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dllama.errors import DllamaError
from dllama.hub.catalog import Model, Variant, find_model
from dllama.model.parts import SPLIT_RE, split_parts  # noqa: F401  (re-exported)

REPO_SPEC_RE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<file>.+))?$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 8 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _human(n: int | None) -> str:
    if n is None:
        return "? B"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------------------
# What to download


@dataclass
class Target:
    """Files of one repository to fetch; `name` is how `--model` will find them again."""

    repo: str
    files: list[str]
    revision: str
    name: str | None  # catalog name[:quant], None for repo:FILE downloads
    variant: Variant | None = None


def is_model_spec(text: str) -> bool:
    """True for a catalog name (with an optional `:quant`) or `owner/repo:FILE`; False for anything else."""
    return find_model(text) is not None or (":" in text and REPO_SPEC_RE.match(text) is not None)


def parse_spec(spec: str, revision: str = "main") -> tuple[str, str | None, Model | None, str | None]:
    """-> (repo, file pattern, catalog model, variant key). Catalog names win over repo specs."""
    found = find_model(spec)
    if found is not None:
        model, key = found
        return model.variants[key].repo, None, model, key
    m = REPO_SPEC_RE.match(spec)
    if m is None:
        raise DllamaError(f"{spec!r} is neither a catalog name (see `dllama models`) nor OWNER/REPO:FILE")
    return m["repo"], m["file"], None, None


def _gated_message(repo: str) -> str:
    return (
        f"{repo} is a gated repository: accept its license on the Hugging Face website with your account, then "
        "set HF_TOKEN to an access token of that account (or run `hf auth login`)"
    )


def _hub_errors(repo: str, e: Exception) -> DllamaError:
    """One clear line for the ways the hub says no."""
    from huggingface_hub import errors

    GatedRepoError, HfHubHTTPError = errors.GatedRepoError, errors.HfHubHTTPError
    OfflineModeIsEnabled, RepositoryNotFoundError = (
        errors.OfflineModeIsEnabled,
        errors.RepositoryNotFoundError,
    )
    RevisionNotFoundError = errors.RevisionNotFoundError
    # renamed in huggingface_hub 1.0 (EntryNotFoundError before)
    RemoteEntryNotFoundError = getattr(errors, "RemoteEntryNotFoundError", None) or errors.EntryNotFoundError

    if isinstance(e, GatedRepoError):
        return DllamaError(_gated_message(repo))
    if isinstance(e, RepositoryNotFoundError):
        return DllamaError(f"repository {repo} not found on the hub (or private: set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return DllamaError(f"revision not found in {repo}")
    if isinstance(e, RemoteEntryNotFoundError):
        return DllamaError(f"file not found in {repo}: {e.response.url if e.response is not None else e}")
    if isinstance(e, OfflineModeIsEnabled):
        return DllamaError("HF_HUB_OFFLINE is set: downloads are disabled (unset it to download)")
    if isinstance(e, HfHubHTTPError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DllamaError(f"hub error for {repo}: {first}")
    return DllamaError(f"cannot reach the hub for {repo}: {type(e).__name__}: {e}")


def _repo_info(repo: str, revision: str):
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise _hub_errors(repo, e) from None


def _select(info, repo: str, pattern: str | None, variant: Variant | None) -> list:
    """Siblings to fetch: the catalog's files, or those matching FILE (a name or glob); a split GGUF's first
    part brings all its parts."""
    siblings = {s.rfilename: s for s in info.siblings or []}
    if variant is not None:
        missing = [f for f in variant.files if f not in siblings]
        if missing:
            raise DllamaError(f"catalog entry is out of date: {repo} has no file {missing[0]}")
        return [siblings[f] for f in variant.files]
    ggufs = sorted(f for f in siblings if f.endswith(".gguf"))
    if not pattern:
        raise DllamaError(
            f"say which file of {repo}: {repo}:FILE, e.g. {repo}:{ggufs[0] if ggufs else 'NAME.gguf'}"
        )
    names = [f for f in siblings if f == pattern or fnmatch.fnmatchcase(f, pattern)]
    if not names:
        hint = ", ".join(ggufs[:8]) + (" ..." if len(ggufs) > 8 else "")
        raise DllamaError(f"no file {pattern!r} in {repo}" + (f" (GGUF files: {hint})" if ggufs else ""))
    chosen: list[str] = []
    for f in sorted(names):
        m = SPLIT_RE.match(os.path.basename(f))
        group = [f]
        if m:
            folder = os.path.dirname(f)
            count = int(m["count"])
            group = [
                "/".join(x for x in (folder, f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") if x)
                for i in range(1, count + 1)
            ]
            absent = [g for g in group if g not in siblings]
            if absent:
                raise DllamaError(f"{repo}: split GGUF part {absent[0]} is not in the repository")
        chosen += [g for g in group if g not in chosen]
    return [siblings[f] for f in chosen]


# ---------------------------------------------------------------------------------------------------------
# The cache


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _storage(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


def _expected_hash(sibling) -> tuple[str, str]:
    """(algorithm, hex): LFS files carry their sha256, small files their git blob sha1."""
    if sibling.lfs is not None:
        return "sha256", sibling.lfs.sha256
    if sibling.blob_id:
        return "git-sha1", sibling.blob_id
    return "", ""


def _hash_file(path: Path, algorithm: str, label: str) -> str:
    from tqdm.auto import tqdm

    size = path.stat().st_size
    h = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {label}",
                                     disable=size < (256 << 20) or None, leave=False) as bar:  # fmt: skip
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _free_bytes(folder: Path) -> int:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:  # no symlinks (some Windows setups): hf_hub_download then keeps the file in snapshots/
        shutil.copyfile(blob, pointer)


def _cached_blob(storage: Path, commit: str, filename: str) -> Path | None:
    pointer = storage / "snapshots" / commit / filename
    return pointer if pointer.exists() else None


# ---------------------------------------------------------------------------------------------------------
# Downloading


def _fetch_one(repo: str, commit: str, revision: str, sibling, *, verify_cached: bool = True) -> Path:
    from filelock import FileLock
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get
    from huggingface_hub.utils import build_hf_headers

    filename = sibling.rfilename
    algorithm, expected = _expected_hash(sibling)
    storage = _storage(repo)
    pointer = storage / "snapshots" / commit / filename

    if pointer.exists() and verify_cached:
        got = _hash_file(pointer, algorithm, filename) if algorithm else None
        if got is None or got == expected:
            log(f"{filename}: already downloaded and verified")
            return pointer
        log(f"{filename}: the cached copy is corrupted ({algorithm} {got[:12]}... instead of {expected[:12]}...): "
            "deleting it and downloading again")  # fmt: skip
        target = pointer.resolve()
        pointer.unlink()
        target.unlink(missing_ok=True)
    elif pointer.exists():
        return pointer

    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=commit))
    except Exception as e:  # noqa: BLE001
        raise _hub_errors(repo, e) from None
    etag = meta.etag or expected
    if algorithm == "sha256" and SHA256_RE.match(etag or "") and etag != expected:
        raise DllamaError(
            f"{repo}/{filename}: the hub's file listing and its download disagree on the sha256"
        )
    size = meta.size if meta.size is not None else sibling.size
    url = hf_hub_url(repo, filename, revision=commit)
    headers = build_hf_headers()
    if meta.location and urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a CDN redirect: like hf_hub_download, keep the token to the hub

    blob = storage / "blobs" / etag
    partial = Path(str(blob) + ".incomplete")
    lock = cache_dir() / ".locks" / storage.name / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)

    for attempt in (1, 2):  # a corrupted download is thrown away and fetched once more
        with FileLock(str(lock)):
            if not blob.exists():
                have = partial.stat().st_size if partial.exists() else 0
                if size is not None and have > size:  # not ours to resume
                    partial.unlink()
                    have = 0
                if have:
                    log(f"{filename}: resuming at {_human(have)} of {_human(size)}")
                with open(partial, "ab") as f:
                    http_get(meta.location or url, f, resume_size=have,
                             headers=headers, expected_size=size, displayed_filename=os.path.basename(filename))  # fmt: skip
                got = _hash_file(partial, algorithm, filename) if algorithm else expected
                if got != expected:
                    partial.unlink()
                    if attempt == 1:
                        log(f"{filename}: refused, {algorithm} {got[:12]}... does not match the hub's "
                            f"{expected[:12]}...; downloading it again")  # fmt: skip
                        continue
                    raise DllamaError(
                        f"{repo}/{filename}: downloaded twice and the {algorithm} does not match the hub's "
                        f"({got} != {expected}); nothing was kept, try again later"
                    )
                os.replace(partial, blob)
            _link(blob, pointer)
            ref = storage / "refs" / revision
            if revision != commit:
                ref.parent.mkdir(parents=True, exist_ok=True)
                if not ref.exists() or ref.read_text() != commit:
                    ref.write_text(commit)
            return pointer
    raise AssertionError("unreachable")


def download(spec: str, revision: str = "main", verify_cached: bool = True) -> tuple[Target, list[Path]]:
    """Downloads what `spec` names (catalog NAME[:quant] or OWNER/REPO:FILE); returns the target and the local
    paths (split GGUFs: every part, first part first)."""
    repo, pattern, model, key = parse_spec(spec, revision)
    variant = model.variants[key] if model else None
    info = _repo_info(repo, revision)
    commit = info.sha or revision
    siblings = _select(info, repo, pattern, variant)

    from huggingface_hub import get_token

    if info.gated and not get_token():
        raise DllamaError(_gated_message(repo))

    # Disk space, before anything is written: what is missing from the cache, minus partial downloads.
    storage = _storage(repo)
    need = 0
    unknown = []
    for s in siblings:
        if _cached_blob(storage, commit, s.rfilename):
            continue
        if s.size is None:
            unknown.append(s.rfilename)
            continue
        algorithm, expected = _expected_hash(s)
        partial = storage / "blobs" / f"{expected}.incomplete"
        have = partial.stat().st_size if expected and partial.exists() else 0
        need += max(0, s.size - have)
    free = _free_bytes(cache_dir())
    if need > free:
        raise DllamaError(
            f"not enough disk space in {cache_dir()}: the download needs {_human(need)}, {_human(free)} is free "
            "(set HF_HUB_CACHE to a bigger disk)"
        )
    total = sum(s.size or 0 for s in siblings)
    log(f"{repo} ({commit[:10]}): {len(siblings)} file(s), {_human(total)}"
        + (f", {_human(need)} to download" if need != total else "")
        + (f" (+{len(unknown)} of unknown size)" if unknown else ""))  # fmt: skip
    paths = [_fetch_one(repo, commit, revision, s, verify_cached=verify_cached) for s in siblings]
    name = None
    if model is not None:
        name = model.name if key == model.default else f"{model.name}:{key}"
    return Target(repo=repo, files=[s.rfilename for s in siblings], revision=revision, name=name,
                  variant=variant), paths  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Finding downloaded models without the network


def cached_file(repo: str, filename: str, revision: str = "main") -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return found if isinstance(found, str) and os.path.exists(found) else None


def variant_paths(variant: Variant, revision: str = "main") -> list[str] | None:
    """Local paths of every file of a catalog variant, or None when any is missing."""
    paths = [cached_file(variant.repo, f, revision) for f in variant.files]
    return None if any(p is None for p in paths) else paths  # type: ignore[return-value]


def local_model_path(spec: str) -> str | None:
    """`--model` look-up: a downloaded catalog name (NAME or NAME:q80) or OWNER/REPO:FILE -> the local path of
    the GGUF (first part when split). Not such a name -> None. Such a name not downloaded -> DllamaError."""
    found = find_model(spec)
    if found is not None:
        model, key = found
        variant = model.variants[key]
        if variant.format != "gguf":
            raise DllamaError(
                f"{spec} is in the original Distributed Llama format (.m/.t), which dllama does not load: "
                f"use `dllama download {model.name}` (GGUF) instead"
            )
        paths = variant_paths(variant)
        if paths is None:
            raise DllamaError(f"model {spec} is not downloaded: run `dllama download {spec}`")
        return paths[0]
    m = REPO_SPEC_RE.match(spec)
    if m is None or not m["file"]:
        return None
    path = cached_file(m["repo"], m["file"])
    if path is None:
        raise DllamaError(f"{spec} is not downloaded: run `dllama download {spec}`")
    return path
