"""URIs for every input and output: a local path or ``s3://bucket/prefix``.

S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), so the same
command runs against AWS, MinIO or a moto server on 127.0.0.1.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs


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


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
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
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
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
        raise StorageError(f"cannot read {uri}: {err}") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; parent folders are created for local paths."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent and not is_s3(uri):
        fs.create_dir(parent, recursive=True)
    try:
        with fs.open_output_stream(path, compression=None) as stream:
            stream.write(data)
    except OSError as err:
        raise StorageError(f"cannot write {uri}: {err}") from err


def make_dirs(uri: str) -> None:
    """Create a local folder (S3 has no folders: a no-op there)."""
    if not is_s3(uri):
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)


def delete(uri: str) -> None:
    """Remove a file or a folder tree if it exists."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Files under a folder URI, recursively, as sorted paths relative to it ('/'-separated).

    A URI naming a single file lists as that file's name. Hidden files and folders (leading '.') are skipped.
    """
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        return [posixpath.basename(root)]
    selector = pafs.FileSelector(root, recursive=True)
    relative = []
    for item in fs.get_file_info(selector):
        if item.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(item.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if suffixes is None or rel.lower().endswith(tuple(s.lower() for s in suffixes)):
            relative.append(rel)
    return sorted(relative)


def file_uri(root_uri: str, relative: str) -> str:
    """The URI of a file listed by :func:`list_files` under ``root_uri`` (which may itself be that file)."""
    fs, path = filesystem(root_uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return root_uri
    return join(root_uri, *relative.split("/"))
