"""URIs for every input and output: a local path or ``s3://bucket/prefix``.

S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), so the same
command runs against AWS, MinIO or a moto server on 127.0.0.1. Without ``AWS_ACCESS_KEY_ID`` the AWS default chain
finds them: a credentials file (``AWS_SHARED_CREDENTIALS_FILE``), an instance profile, a pod identity.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A URI that cannot be read or written; the message names the URI and what to check."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (local paths keep their OS form)."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def absolute(uri: str) -> str:
    """``uri`` with a relative local path made absolute (processes that change directory, like Tune trials, agree)."""
    return uri if "://" in uri else str(Path(uri).absolute())


def access_error(err: OSError, uri: str | None = None, action: str = "access") -> StorageError:
    """One line for a failed filesystem call: what was tried on which URI, why, and for S3 what to check."""
    reason = " ".join(str(err).split())
    message = f"cannot {action} {uri}: {reason}" if uri else f"cannot {action} storage: {reason}"
    if (uri is not None and is_s3(uri)) or "AWS Error" in reason:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        where = f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "AWS (AWS_ENDPOINT_URL is unset)"
        message += f"; check that {where} is reachable and that the credentials are valid (AWS_ACCESS_KEY_ID / " \
                   "AWS_SECRET_ACCESS_KEY, else the AWS default chain: a credentials file, an instance profile)"
    return StorageError(message)


@contextlib.contextmanager
def _accessing(uri: str, action: str) -> Iterator[None]:
    """Turn the OSError of a filesystem call on ``uri`` (an unreachable endpoint, a refused permission) into
    :func:`access_error`'s StorageError."""
    try:
        yield
    except OSError as err:
        raise access_error(err, uri, action) from err


def _s3_filesystem(**options) -> pafs.S3FileSystem:
    """The S3 filesystem of the AWS_* environment; ``options`` are further S3FileSystem arguments (timeouts)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                    **options}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI and the path within it ('bucket/key' for S3, absolute for local)."""
    if is_s3(uri):
        return _s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).absolute())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with _accessing(uri, "look up"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    with _accessing(uri, "look up"):
        return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        # compression=None: pyarrow would otherwise gunzip "*.gz" on the fly, hiding a truncated .nii.gz.
        with fs.open_input_stream(path, compression=None) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise StorageError(f"{uri} does not exist") from err
    except OSError as err:
        raise access_error(err, uri, "read") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; parent folders are created for local paths."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    with _accessing(uri, "write"):
        if parent and not is_s3(uri):
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path, compression=None) as stream:
            stream.write(data)


def make_dirs(uri: str) -> None:
    """Create a local folder (S3 has no folders: a no-op there)."""
    if not is_s3(uri):
        fs, path = filesystem(uri)
        with _accessing(uri, "create"):
            fs.create_dir(path, recursive=True)


def delete(uri: str) -> None:
    """Remove a file or a folder tree if it exists."""
    fs, path = filesystem(uri)
    with _accessing(uri, "delete"):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)


def check_writable(uri: str, timeout_s: float = 5.0) -> None:
    """Write and delete a small hidden probe object in folder ``uri``, leaving the storage as it was (a local folder
    created for the probe is removed again; on S3, pyarrow keeps an empty folder marker for a new prefix, as after any
    delete); a StorageError naming the URI and what to check when it is unreachable, missing or read-only.

    S3 is asked once, with ``timeout_s`` connect and request timeouts and no retries, so an unreachable endpoint fails
    in seconds rather than after the SDK's retries; a missing bucket is named as such.
    """
    if is_s3(uri):
        fs = _s3_filesystem(connect_timeout=timeout_s, request_timeout=timeout_s,
                            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        root = uri[len("s3://"):].rstrip("/")
        bucket = root.split("/", 1)[0]
        with _accessing(uri, "reach"):
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        if missing:
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS"
            raise StorageError(f"bucket {bucket} of {uri} does not exist at {endpoint}; create it, or point the "
                               "storage root at an existing bucket (AWS_ENDPOINT_URL names the S3 endpoint)")
    else:
        fs, root = filesystem(uri)
    probe = posixpath.join(root, f".raymem-probe-{uuid.uuid4().hex}")  # hidden: list_files never lists a leftover
    created = None if is_s3(uri) else _outermost_missing(root)
    with _accessing(uri, "write to"):
        try:
            if created:
                fs.create_dir(root, recursive=True)
            with fs.open_output_stream(probe, compression=None) as stream:
                stream.write(b"raymem write check\n")
            fs.delete_file(probe)
        finally:
            if created and os.path.isdir(created):
                fs.delete_dir(created)


def _outermost_missing(path: str) -> str | None:
    """The outermost folder of local ``path`` that does not exist yet (the first a recursive mkdir creates), or None."""
    outermost = None
    while not os.path.lexists(path):
        outermost, path = path, os.path.dirname(path)
    return outermost


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Files under a folder URI, recursively, as sorted paths relative to it ('/'-separated).

    A URI naming a single file lists as that file's name. Hidden files and folders (leading '.') are skipped, and
    only regular files are listed: a FIFO, socket or device is never opened.

    A local folder is walked here rather than by pyarrow, so that symlinks cannot multiply the input:

    - symlinks are followed, also out of the root (an export often links its data in); a path is listed as seen
      under the root, through the link, so :func:`file_uri` reads it;
    - each real folder is walked once and each real file listed once (same ``(st_dev, st_ino)``, hard links
      included), under the first of its paths in sorted order; so a symlink cycle stops where it closes;
    - broken symlinks and unreadable subfolders are skipped with a logged warning (naming the root only:
      folder names may be patient names).

    S3 has no symlinks: it is listed with pyarrow's recursive selector.
    """
    fs, root = filesystem(uri)
    if not is_s3(uri):
        return _list_local_files(uri, root, suffixes)
    try:
        info = fs.get_file_info(root)
        items = fs.get_file_info(pafs.FileSelector(root, recursive=True)) \
            if info.type == pafs.FileType.Directory else []
    except OSError as err:
        raise access_error(err, uri, "list") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        return [posixpath.basename(root)]
    relative = []
    for item in items:
        if item.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(item.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if _has_suffix(rel, suffixes):
            relative.append(rel)
    return sorted(relative)


def _has_suffix(rel: str, suffixes: tuple[str, ...] | None) -> bool:
    return suffixes is None or rel.lower().endswith(tuple(s.lower() for s in suffixes))


def _list_local_files(uri: str, root: str, suffixes: tuple[str, ...] | None) -> list[str]:
    """:func:`list_files` for ``root``, the absolute local path of ``uri``: depth first, in sorted order."""
    try:
        root_info = os.stat(root)
    except FileNotFoundError as err:
        raise StorageError(f"{uri} does not exist") from err
    except OSError as err:
        raise access_error(err, uri, "read") from err
    if stat.S_ISREG(root_info.st_mode):
        return [os.path.basename(root)]
    files: list[str] = []
    walked_folders: set[tuple[int, int]] = set()
    listed_files: set[tuple[int, int]] = set()
    # (path relative to the root, local path, stat through symlinks); the walk pops paths in sorted order, so the
    # first path to a folder or file is the one kept.
    pending = [("", root, root_info)]
    while pending:
        rel, path, info = pending.pop()
        identity = (info.st_dev, info.st_ino)
        if stat.S_ISDIR(info.st_mode):
            if identity not in walked_folders:
                walked_folders.add(identity)
                pending.extend(reversed(_local_folder_entries(uri, rel, path)))
        elif stat.S_ISREG(info.st_mode) and _has_suffix(rel, suffixes) and identity not in listed_files:
            listed_files.add(identity)
            files.append(rel)
    return files


def _local_folder_entries(uri: str, rel: str, path: str) -> list[tuple[str, str, os.stat_result]]:
    """The visible folders and regular files in folder ``path`` (``rel`` under ``uri``; '' for the root itself).

    Returns (path relative to the root, local path, stat through symlinks), sorted so that a depth-first walk lists
    files in ``sorted()`` order. Broken symlinks, links to special files, and FIFOs, sockets and devices are left out.
    """
    try:
        with os.scandir(path) as entries:
            names = sorted(entry.name for entry in entries if not entry.name.startswith("."))
    except OSError as err:
        if not rel:
            raise StorageError(f"cannot list {uri}: {err}; check that the folder is readable") from err
        # Folder and file names may be patient names: the log names the root and the error kind only.
        log.warning("skipping a folder under %s: cannot list it (%s)", uri, err.strerror)
        return []
    children = []
    for name in names:
        child_path = os.path.join(path, name)
        try:
            info = os.stat(child_path)
        except OSError as err:
            log.warning("skipping an entry under %s: a broken symlink or unreadable entry (%s)", uri, err.strerror)
            continue
        if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
            children.append((posixpath.join(rel, name), child_path, info))
    # A folder sorts by its name plus '/', as its files' paths do: 'a-b/x' < 'a/x' since '-' < '/'.
    return sorted(children, key=lambda child: child[0] + "/" if stat.S_ISDIR(child[2].st_mode) else child[0])


def file_uri(root_uri: str, relative: str) -> str:
    """The URI of a file listed by :func:`list_files` under ``root_uri`` (which may itself be that file)."""
    fs, path = filesystem(root_uri)
    with _accessing(root_uri, "look up"):
        if fs.get_file_info(path).type == pafs.FileType.File:
            return root_uri
    return join(root_uri, *relative.split("/"))


def move(src_uri: str, dst_uri: str) -> None:
    """Move one file (a rename for local paths; copy then delete on S3, which has no rename)."""
    fs, src = filesystem(src_uri)
    _, dst = filesystem(dst_uri)
    if not is_s3(dst_uri):
        fs.create_dir(posixpath.dirname(dst), recursive=True)
    try:
        if is_s3(src_uri):
            fs.copy_file(src, dst)
            fs.delete_file(src)
        else:
            fs.move(src, dst)
    except OSError as err:
        raise StorageError(f"cannot move {src_uri} to {dst_uri}: {err}") from err
