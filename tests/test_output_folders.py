"""Every writer of a folder or file the user names leaves alone what it did not write (issue 33).

`export` (write_pretrained) replaces only an earlier export of ours, atomically, and recovers from a kill between
its two renames; `generate -o` replaces only its own earlier mp4; the shard merge removes only shards and group
records of ours; the server's state folder keeps what else is in it. The training run and evaluate cases ride on
their own modules' fixtures (tests/test_export.py, tests/test_evaluate.py)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from models.dualforce import DualForce
from models.dualforce import serialization as ser
from models.dualforce.config import get_config
from models.dualforce.serialization import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ForeignFolderError,
    check_output_folder,
    read_pretrained,
    write_pretrained,
)

CONFIG = get_config("tiny")


def _write(path, value: float):
    return write_pretrained(path, CONFIG, {"w": torch.full((3,), value)}, {"step": int(value)})


def _weights(path) -> float:
    return float(read_pretrained(path)[1]["w"][0])


def _siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_a_folder_with_a_user_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("notes")
    with pytest.raises(ForeignFolderError, match=r"out is not an earlier DualForce export \(it holds mine.txt\)"):
        _write(out, 1)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "notes"
    assert _siblings(out) == []  # no temp folder left either
    # beside our own files too: an export plus a user's file is no longer only ours
    _write(tmp_path / "m", 1)
    (tmp_path / "m" / "README.md").write_text("my model card")
    with pytest.raises(ForeignFolderError, match=r"holds README.md\)"):
        _write(tmp_path / "m", 2)
    assert _weights(tmp_path / "m") == 1 and (tmp_path / "m" / "README.md").read_text() == "my model card"


def test_what_counts_as_ours(tmp_path):
    check_output_folder(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", 3)  # an empty folder: fine to write into
    assert _weights(tmp_path / "empty") == 3
    many = tmp_path / "many"
    many.mkdir()
    for i in range(8):
        (many / f"f{i}.txt").write_text("x")
    with pytest.raises(ForeignFolderError, match=r"holds f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 3 more"):
        check_output_folder(many)
    other = tmp_path / "diffusers"  # someone else's config.json beside safetensors weights
    other.mkdir()
    (other / CONFIG_FILE).write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (other / WEIGHTS_FILE).write_bytes(b"x")
    with pytest.raises(ForeignFolderError, match="not an earlier DualForce export"):
        check_output_folder(other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ForeignFolderError, match="is a file"):
        check_output_folder(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(ForeignFolderError, match="symbolic link"):
        check_output_folder(tmp_path / "link")


def test_re_exporting_replaces_the_earlier_export_atomically(tmp_path):
    out = tmp_path / "m"
    DualForce(CONFIG).save_pretrained(out, {"step": 1})
    _write(out, 2)
    assert _weights(out) == 2 and read_pretrained(out)[2] == {"step": 2}
    assert _siblings(out) == []  # no .m.tmp-* / .m.old-* left


def test_a_failed_second_rename_puts_the_earlier_export_back(tmp_path, monkeypatch):
    out = tmp_path / "m"
    _write(out, 1)
    (tmp_path / "mine.txt").write_text("notes")  # a user's file beside the export
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(src, dst)

    monkeypatch.setattr(ser.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk went away"):
        _write(out, 2)
    assert _weights(out) == 1 and _siblings(out) == ["mine.txt"]


def test_a_kill_between_the_renames_loses_nothing_and_the_next_export_recovers(tmp_path, monkeypatch):
    out = tmp_path / "m"
    _write(out, 1)
    (tmp_path / "mine.txt").write_text("notes")
    foreign = tmp_path / ".m.old-999999999"  # named like a leftover, but not ours: kept
    foreign.mkdir()
    (foreign / "diary.txt").write_text("mine")
    real, calls = os.replace, []

    def killed_after_first(src, dst):  # the process "dies" after its first rename: nothing after it happens
        calls.append(src)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ser.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        _write(out, 2)
    monkeypatch.setattr(ser.os, "replace", real)
    # the earlier export is whole beside the target; the user's files are untouched
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".m.old-") and p != foreign]
    assert not out.exists() and len(left) == 1 and _weights(left[0]) == 1
    assert (tmp_path / "mine.txt").read_text() == "notes"
    with pytest.raises(FileNotFoundError, match=r"an interrupted export left \.m\.old-"):
        read_pretrained(out)
    # a half-written temp folder of a killed export (a dead pid) is ours to clean too
    half = tmp_path / ".m.tmp-999999998-deadbeef"
    half.mkdir()
    (half / WEIGHTS_FILE).write_bytes(b"half")
    _write(out, 3)
    assert _weights(out) == 3
    assert _siblings(out) == [".m.old-999999999", "mine.txt"] and (foreign / "diary.txt").read_text() == "mine"


def test_export_command_refuses_a_foreign_folder_before_reading_anything(tmp_path, capsys, monkeypatch):
    """Exit 2, one line naming the folder and what is in it, no traceback; the run is not even opened."""
    from flows.cli import main
    from training import export

    monkeypatch.setattr(export.TrainConfig, "load", lambda *a: pytest.fail("the run was read"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("notes")
    assert main(["export", str(tmp_path / "run"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "mine.txt" in err and "Traceback" not in err
    assert (out / "mine.txt").read_text() == "notes" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_generate_refuses_to_replace_a_file_it_did_not_write(tmp_path, capsys):
    from flows.cli import main
    from training.generate import GenerateError, check_video_target

    video = tmp_path / "holiday.mp4"
    video.write_bytes(b"my own video")
    args = ["generate", "--model", str(tmp_path / "absent-model"), "--image", str(tmp_path / "face.png"),
            "--audio", str(tmp_path / "speech.wav"), "--no-progress"]
    assert main([*args, "-o", str(video)]) == 2  # refused before the model is even looked for
    assert "holiday.mp4 exists and is not an earlier output of generate" in capsys.readouterr().err
    assert video.read_bytes() == b"my own video"
    notes = tmp_path / "new.mp4.json"
    notes.write_text("[1, 2]")
    with pytest.raises(GenerateError, match="new.mp4.json is not a record of an earlier generate"):
        check_video_target(tmp_path / "new.mp4")
    with pytest.raises(GenerateError, match="is a folder"):
        check_video_target(tmp_path)
    # an earlier output of ours (the mp4 with its record beside it) may be replaced
    ours = tmp_path / "ours.mp4"
    ours.write_bytes(b"generated")
    (tmp_path / "ours.mp4.json").write_text(json.dumps({"video": str(ours), "latent_frames": 2, "options": {},
                                                        "extractors": {}}))
    check_video_target(ours)
    check_video_target(tmp_path / "fresh.mp4")


def test_the_shard_merge_removes_only_its_own_stale_files(tmp_path):
    from tasks.steps.shard import collect_garbage

    root = tmp_path / "shards"
    files = {"train/shard-g0000-000000.tar": "kept", "train/shard-g0000-000001.tar": "stale",
             "_groups/g0000.json": "{}", "_groups/g0099.json": "{}", "train/.shard-g0000-000002.tar.tmp-deadbeef": "",
             "index.parquet": "", "audit.json": "{}", "notes.txt": "mine", "train/README": "mine",
             "extra/table.csv": "mine"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    removed = collect_garbage(root, {"train/shard-g0000-000000.tar"}, {"g0000"})
    assert sorted(removed) == ["_groups/g0099.json", "train/.shard-g0000-000002.tar.tmp-deadbeef",
                               "train/shard-g0000-000001.tar"]
    for rel in ("audit.json", "notes.txt", "train/README", "extra/table.csv", "index.parquet"):
        assert (root / rel).read_text() == files[rel]


def test_the_server_state_folder_keeps_what_else_is_in_it(tmp_path):
    from flows import server as srv
    from flows.server_state import ServerRecord, record_path, save_record

    (tmp_path / "notes.txt").write_text("mine")
    save_record(tmp_path, ServerRecord(port=4200, api_url="http://127.0.0.1:4200/api", prefect_home=str(tmp_path),
                                       repo=str(tmp_path), work_pool=srv.WORK_POOL, started_at=0.0))
    assert srv.server_down(tmp_path, timeout=1, log=lambda m: None) == []
    assert not record_path(tmp_path).exists() and (tmp_path / "notes.txt").read_text() == "mine"
