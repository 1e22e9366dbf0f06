"""storage.list_files on local folders: symlinks, duplicates and special files never multiply or hang the input."""

import logging
import logging.handlers
import os
import re
from pathlib import Path

import pytest

from raymem import storage
from raymem.storage import StorageError, list_files


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def storage_warnings():
    """The messages raymem.storage logs at WARNING during the test (pytest's caplog is off in this project)."""
    records = logging.handlers.BufferingHandler(capacity=100)
    logger = logging.getLogger("raymem.storage")
    logger.addHandler(records)
    yield records.buffer
    logger.removeHandler(records)


def messages(records: list[logging.LogRecord]) -> list[str]:
    return [record.getMessage() for record in records if record.levelno == logging.WARNING]


def test_plain_tree_lists_sorted_relative_paths(tmp_path):
    for rel in ["b.nii", "a/x.png", "a-b/y.png", "sub/deep/z.dcm"]:
        touch(tmp_path / rel)

    assert list_files(str(tmp_path)) == ["a-b/y.png", "a/x.png", "b.nii", "sub/deep/z.dcm"]


def test_suffixes_filter_case_insensitively(tmp_path):
    for rel in ["a.PNG", "b.nii.gz", "c.txt"]:
        touch(tmp_path / rel)

    assert list_files(str(tmp_path), (".png", ".nii.gz")) == ["a.PNG", "b.nii.gz"]


def test_single_file_lists_as_its_name(tmp_path):
    scan = touch(tmp_path / "scan.nii.gz")

    assert list_files(str(scan)) == ["scan.nii.gz"]


def test_missing_uri_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list_files(str(tmp_path / "nowhere"))


def test_hidden_files_and_folders_are_skipped(tmp_path):
    for rel in ["img.png", ".hidden.png", ".git/objects/x.png", "sub/.DS_Store", "sub/kept.png"]:
        touch(tmp_path / rel)

    assert list_files(str(tmp_path)) == ["img.png", "sub/kept.png"]


def test_folder_linking_to_itself_is_walked_once(tmp_path):
    touch(tmp_path / "scan" / "img.png")
    (tmp_path / "scan" / "loop").symlink_to(tmp_path / "scan", target_is_directory=True)

    assert list_files(str(tmp_path)) == ["scan/img.png"]


def test_two_folder_cycle_lists_each_image_once(tmp_path):
    # The reported case: a/to_b -> ../b and b/to_a -> ../a turned two images into 82.
    touch(tmp_path / "a" / "img1.png")
    touch(tmp_path / "b" / "img2.png")
    (tmp_path / "a" / "to_b").symlink_to("../b", target_is_directory=True)
    (tmp_path / "b" / "to_a").symlink_to("../a", target_is_directory=True)

    # b is first reached as a/to_b, which sorts before b/.
    assert list_files(str(tmp_path)) == ["a/img1.png", "a/to_b/img2.png"]


def test_two_links_to_one_outside_folder_count_its_files_once(tmp_path):
    export = tmp_path / "export"
    touch(export / "img.png")
    root = tmp_path / "data"
    root.mkdir()
    (root / "p1").symlink_to(export, target_is_directory=True)
    (root / "p2").symlink_to(export, target_is_directory=True)

    assert list_files(str(root)) == ["p1/img.png"]


def test_file_linked_from_outside_the_root_is_listed_through_the_link(tmp_path):
    outside = touch(tmp_path / "export" / "scan.png")
    root = tmp_path / "data"
    root.mkdir()
    (root / "linked.png").symlink_to(outside)

    assert list_files(str(root)) == ["linked.png"]


def test_file_under_several_names_is_listed_once(tmp_path):
    real = touch(tmp_path / "img.png")
    (tmp_path / "img_link.png").symlink_to(real)
    os.link(real, tmp_path / "img_hardlink.png")

    assert list_files(str(tmp_path)) == ["img.png"]


def test_broken_symlinks_are_skipped_with_a_warning(tmp_path, storage_warnings):
    touch(tmp_path / "img.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "self").symlink_to(tmp_path / "self")

    assert list_files(str(tmp_path)) == ["img.png"]
    warned = messages(storage_warnings)
    assert [m.split(":")[0] for m in warned] == [f"skipping an entry under {tmp_path}"] * 2
    assert not any("gone" in m or "self" in m.replace(str(tmp_path), "") for m in warned)  # names may be PHI


@pytest.mark.timeout(20)
def test_fifo_and_links_to_it_are_never_opened(tmp_path):
    touch(tmp_path / "img.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "pipe_link.png").symlink_to(tmp_path / "pipe.png")

    assert list_files(str(tmp_path)) == ["img.png"]


@pytest.mark.timeout(20)
def test_fifo_as_the_uri_lists_nothing(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")

    assert list_files(str(tmp_path / "pipe.png")) == []


def test_unreadable_subfolder_is_skipped_with_a_warning(tmp_path, monkeypatch, storage_warnings):
    touch(tmp_path / "img.png")
    locked = touch(tmp_path / "locked" / "secret.png").parent
    # Tests may run as root, where chmod cannot lock a folder: refuse the listing itself.
    scandir = os.scandir

    def refuse_locked(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(storage.os, "scandir", refuse_locked)

    assert list_files(str(tmp_path)) == ["img.png"]
    warned = messages(storage_warnings)
    assert [m.split(":")[0] for m in warned] == [f"skipping a folder under {tmp_path}"]
    assert "locked" not in warned[0].replace(str(tmp_path), "")  # folder names may be patient names


def test_unreadable_root_is_a_storage_error(tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(storage.os, "scandir", refuse)

    with pytest.raises(StorageError, match=f"cannot list {re.escape(str(tmp_path))}: .*Permission denied"):
        list_files(str(tmp_path))
