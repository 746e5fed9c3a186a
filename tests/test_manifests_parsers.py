"""Each dataset parser on a small fixture written in that dataset's published format."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from datasets_manifest import DATASETS, PARSERS, ManifestSourceError, build_manifest
from datasets_manifest.schema import sanitize_clip_id

FIX = Path(__file__).parent / "fixtures" / "manifests"


def by_id(build):
    return {r.clip_id: r for r in build.rows}


def reasons(build):
    return {e.where: e.reason for e in build.errors}


def test_registry_lists_every_dataset():
    assert DATASETS == ("hdtf", "celebvhq", "vfhq", "talkvid", "voxceleb2", "mead", "panda70m", "samples")
    assert set(PARSERS) == set(DATASETS) and all(callable(p) for p in PARSERS.values())


def test_hdtf():
    b = build_manifest("hdtf", FIX / "hdtf")
    rows = by_id(b)
    assert sorted(rows) == ["hdtf_RD_Radio1_0", "hdtf_WDA_JaneDoe0_0", "hdtf_WDA_JaneDoe1_0", "hdtf_WDA_JaneDoe1_1"]
    r = rows["hdtf_RD_Radio1_0"]
    assert (r.source, r.start_s, r.end_s, r.identity) == ("youtube:QwErTyUiOp1", 20.0, 95.0, "Radio1")
    assert r.face_box == [483.0, 0.0, 873.0, 390.0]  # x w y h = 483 390 0 390
    r = rows["hdtf_WDA_JaneDoe0_0"]  # BOM-prefixed url file still read
    assert (r.source, r.start_s, r.end_s, r.identity) == ("youtube:AbCdEfGhIj0", 5.0, 175.0, "JaneDoe")
    assert r.face_box == [306.0, 41.0, 786.0, 521.0]
    r = rows["hdtf_WDA_JaneDoe1_1"]  # "&t=6s" in the url, no crop line for clip 1
    assert (r.source, r.start_s, r.end_s, r.face_box) == ("youtube:AbCdEfGhIj1", 120.0, 160.0, None)
    assert rows["hdtf_WDA_JaneDoe1_0"].identity == "JaneDoe"  # JaneDoe0 / JaneDoe1: one person
    errs = reasons(b)
    assert len(errs) == 4
    assert "end_s (30.0) must be after start_s (60.0)" in errs["RD_annotion_time.txt:2 clip 0"]
    assert "crop line needs 4 numbers" in errs["WDA_annotion_time.txt:2 clip 2"]
    assert "bad clock time '0x:05'" in errs["WDA_annotion_time.txt:3 clip 0"]
    assert "no line in WDA_video_url.txt" in errs["WDA_annotion_time.txt:4"]


def test_hdtf_accepts_the_repository_root(tmp_path):
    (tmp_path / "HDTF_dataset").symlink_to(FIX / "hdtf", target_is_directory=True)
    assert len(build_manifest("hdtf", tmp_path).rows) == 4


def test_celebvhq():
    b = build_manifest("celebvhq", FIX / "celebvhq" / "celebvhq_info.json")
    rows = by_id(b)
    assert sorted(rows) == ["celebvhq_Aa1Bb2Cc3Dd_0", "celebvhq_Aa1Bb2Cc3Dd_1", "celebvhq__0tf2n3rlJ9_0"]
    r = rows["celebvhq_Aa1Bb2Cc3Dd_0"]
    assert (r.source, r.start_s, r.end_s, r.identity) == ("youtube:Aa1Bb2Cc3Dd", 81.62, 86.17, "Aa1Bb2Cc3Dd")
    assert r.face_box is None  # published box is normalised 0..1, not source pixels
    assert rows["celebvhq__0tf2n3rlJ9_0"].source == "youtube:_0tf2n3rlJ9"
    errs = reasons(b)
    assert "end_s (10.0) must be after start_s (12.0)" in errs["celebvhq_info.json#Zz9Yy8Xx7Ww_3"]
    assert "top < bottom" in errs["celebvhq_info.json#Zz9Yy8Xx7Ww_4"]
    assert errs["celebvhq_info.json#Qq1Ww2Ee3Rr_0"] == "missing field 'ytb_id'"
    # the folder holding the json works too
    assert len(build_manifest("celebvhq", FIX / "celebvhq").rows) == 3


def test_vfhq():
    b = build_manifest("vfhq", FIX / "vfhq")
    rows = by_id(b)
    assert sorted(rows) == ["vfhq_Ab12Cd34Ef5_P0_C0", "vfhq_Ab12Cd34Ef5_P1_C2"]
    r = rows["vfhq_Ab12Cd34Ef5_P0_C0"]  # F100-226 at 25 fps: frames 101..225
    assert (r.source, r.identity, r.face_box) == ("youtube:Ab12Cd34Ef5", "Ab12Cd34Ef5_P0", [446.0, 6.0, 937.0, 497.0])
    assert r.start_s == pytest.approx(101 / 25) and r.end_s == pytest.approx(225 / 25)
    r = rows["vfhq_Ab12Cd34Ef5_P1_C2"]  # F300-451 at 30 fps
    assert r.start_s == pytest.approx(301 / 30) and r.end_s == pytest.approx(450 / 30)
    assert r.identity == "Ab12Cd34Ef5_P1"
    errs = reasons(b)
    assert errs["Clip+Gh67Ij89Kl0+P0+C1+F0-76.txt"] == "missing header line 'CROP'"
    assert "not inside the 1920x1080 frame" in errs["Clip+Gh67Ij89Kl0+P0+C2+F80-200.txt"]
    assert "is not Clip+<video id>" in errs["notes_about_clip.txt"]


def test_talkvid_json_and_jsonl():
    b = build_manifest("talkvid", FIX / "talkvid")
    rows = by_id(b)
    assert sorted(rows) == [
        "talkvid_videovideoQq1Ww2Ee3Rr-scene1-scene1",
        "talkvid_videovideoTr6MMsoWAo1-scene1-scene1",
        "talkvid_videovideoTr6MMsoWAo1-scene3-scene1",
        "talkvid_videovideoXy7NNtpXBp2-scene2-scene1",
    ]
    r = rows["talkvid_videovideoTr6MMsoWAo1-scene1-scene1"]
    assert (r.source, r.start_s, r.identity) == ("youtube:Tr6MMsoWAo1", 0.1, "597")
    assert r.end_s == pytest.approx(5.141666666666667)
    assert rows["talkvid_videovideoXy7NNtpXBp2-scene2-scene1"].identity == "1203"
    errs = reasons(b)
    assert errs["talkvid_meta.json#3"] == "missing field 'start-time'"
    assert errs["extra.jsonl:2"].startswith("invalid JSON line")
    assert "not an http(s) URL" in errs["extra.jsonl:3"]


def test_voxceleb2_txt_mp4_and_published_split():
    b = build_manifest("voxceleb2", FIX / "voxceleb2")
    rows = by_id(b)
    assert sorted(rows) == [
        "voxceleb2_id00001_AAAAAAAAAA1_00001",
        "voxceleb2_id00001_AAAAAAAAAA1_00002",
        "voxceleb2_id00002_BBBBBBBBBB2_00001",
    ]
    r = rows["voxceleb2_id00001_AAAAAAAAAA1_00001"]  # txt only: frames 245..344 of the YouTube video
    assert (r.source, r.start_s, r.end_s, r.identity) == ("youtube:AAAAAAAAAA1", 245 / 25, 345 / 25, "id00001")
    assert r.face_box is None  # VoxCeleb2 boxes are normalised
    r = rows["voxceleb2_id00001_AAAAAAAAAA1_00002"]  # local mp4 wins; 100 tracked frames -> 4 s
    assert r.source == str((FIX / "voxceleb2/dev/mp4/id00001/AAAAAAAAAA1/00002.mp4").resolve())
    assert (r.start_s, r.end_s) == (0.0, 4.0)
    r = rows["voxceleb2_id00002_BBBBBBBBBB2_00001"]
    assert (r.start_s, r.end_s, r.split) == (2.0, 5.0, "test")  # published test split honoured
    assert all(rows[k].split in ("train", "val") for k in rows if "id00001" in k)  # dev never goes to test
    errs = reasons(b)
    assert errs["id00003/CCCCCCCCCC3/00001"] == "audio only (m4a without its mp4 video)"
    assert "Identity 'id09999' differs from its folder 'id00004'" in errs["id00004/DDDDDDDDDD4/00001"]


def test_voxceleb2_pixel_boxes_become_a_union_box(tmp_path):
    d = tmp_path / "txt" / "id00007" / "EEEEEEEEEE5"
    d.mkdir(parents=True)
    (d / "00003.txt").write_text(
        "Identity  : \tid00007\nReference : \tEEEEEEEEEE5\nOffset    : \t0\nFV Conf   : \t10.0\t(1)\n"
        "ASD Conf  : \t3.0\n\nFRAME \tX \tY \tW \tH \n000010 \t100\t50\t80\t90\n000011 \t104\t48\t80\t92\n"
    )
    (row,) = build_manifest("voxceleb2", tmp_path).rows
    assert row.face_box == [100.0, 48.0, 184.0, 140.0]
    assert (row.start_s, row.end_s) == (10 / 25, 12 / 25)


def test_mead_layout():
    b = build_manifest("mead", FIX / "mead")
    rows = by_id(b)
    assert sorted(rows) == [
        "mead_M003_front_angry_level_1_001",
        "mead_M003_left_30_happy_level_2_002",
        "mead_W009_front_neutral_level_1_001",
    ]
    r = rows["mead_M003_left_30_happy_level_2_002"]
    assert r.source == str((FIX / "mead/M003/video/left_30/happy/level_2/002.mp4").resolve())
    assert (r.identity, r.start_s, r.end_s) == ("M003", 0.0, None)
    errs = reasons(b)
    assert errs["M003/video/front/angry/level_9/003.mp4"] == "level 'level_9' is not level_1..level_3"
    assert errs["W009/video/front/bored/level_1/001.mp4"].startswith("emotion 'bored' is not one of")
    assert not any("audio" in k for k in errs)  # the audio/ tree is not a video and not an error


def test_panda70m_lists_and_published_split():
    b = build_manifest("panda70m", FIX / "panda70m")
    rows = by_id(b)
    assert sorted(rows) == ["panda70m_--0K3Rm3Bv4_0", "panda70m_--0K3Rm3Bv4_1", "panda70m_Hh5Jj6Kk7Ll_0",
                            "panda70m_Hh5Jj6Kk7Ll_2"]
    r = rows["panda70m_--0K3Rm3Bv4_1"]
    assert (r.source, r.start_s, r.end_s, r.identity) == ("youtube:--0K3Rm3Bv4", 5.005, 12.345, "--0K3Rm3Bv4")
    assert (rows["panda70m_Hh5Jj6Kk7Ll_2"].start_s, rows["panda70m_Hh5Jj6Kk7Ll_2"].end_s) == (3600.0, 3603.25)
    assert {r.split for r in b.rows} == {"val"}  # panda70m_validation.csv
    errs = reasons(b)
    assert errs["panda70m_validation.csv:3 clip 1"] == "bad clock time '0:01:0x.000'"
    assert errs["panda70m_validation.csv:4 clip 0"].startswith("expected [start, end]")
    assert errs["panda70m_validation.csv:5"].startswith("timestamp is not a list literal")  # never eval'd


def test_samples_on_the_shared_clips(samples_dir):
    b = build_manifest("samples", samples_dir)
    rows = by_id(b)
    assert set(rows) == {"samples_sun", "samples_yongen"}  # top level only: more/ is not read
    assert b.errors == []
    sun = rows["samples_sun"]
    assert sun.identity == "sun" and sun.dataset == "samples"
    assert sun.source == str((samples_dir / "sun.mp4").resolve())
    assert sun.end_s == pytest.approx(22.0, abs=0.1)  # ATTRIBUTION.md: 22 s
    assert rows["samples_yongen"].end_s == pytest.approx(10.7, abs=0.1)
    assert "MuseTalk" in sun.attribution and "MIT" in sun.attribution
    assert {r.split for r in b.rows} == {"train"}  # 2 identities < 20: all train


def test_samples_ids_are_sanitised_and_bad_files_reported(tmp_path, samples_dir):
    (tmp_path / "my clip.v2.mp4").symlink_to(samples_dir / "yongen.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    b = build_manifest("samples", tmp_path)
    (row,) = b.rows
    digest = hashlib.sha256(b"samples_my clip.v2").hexdigest()[:10]  # cleaning changed it: the original's hash
    assert row.clip_id == f"samples_my_clip-v2-{digest}" and row.identity == "my clip.v2" and row.attribution == ""
    (err,) = b.errors
    assert err.where == "broken.mp4" and "not a readable media file" in err.reason


@pytest.mark.parametrize("dataset", DATASETS)
def test_missing_source_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(ManifestSourceError, match=f"{dataset}: source .*nowhere does not exist"):
        build_manifest(dataset, tmp_path / "nowhere")


@pytest.mark.parametrize("dataset", ["hdtf", "vfhq", "talkvid", "voxceleb2", "mead", "panda70m", "samples"])
def test_empty_folder_is_not_the_dataset(dataset, tmp_path):
    with pytest.raises(ManifestSourceError, match=f"{dataset}: cannot read"):
        build_manifest(dataset, tmp_path)


def test_unreadable_json_is_a_source_error(tmp_path):
    (tmp_path / "celebvhq_info.json").write_text("{not json")
    with pytest.raises(ManifestSourceError, match="not valid JSON"):
        build_manifest("celebvhq", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'vox3'; known: hdtf, celebvhq"):
        build_manifest("vox3", FIX)


def test_one_broken_file_in_a_folder_is_reported_not_fatal(tmp_path):
    import shutil

    shutil.copytree(FIX / "talkvid", tmp_path / "talkvid")
    (tmp_path / "talkvid" / "zz_broken.json").write_text("[{\"id\": ")
    b = build_manifest("talkvid", tmp_path / "talkvid")
    assert len(b.rows) == 4
    assert "is not valid JSON" in reasons(b)["zz_broken.json"]

    shutil.copytree(FIX / "panda70m", tmp_path / "panda")
    (tmp_path / "panda" / "other.csv").write_text("a,b\n1,2\n")
    b = build_manifest("panda70m", tmp_path / "panda")
    assert len(b.rows) == 4 and "lacks Panda-70M columns ['videoID', 'url', 'timestamp']" in reasons(b)["other.csv"]


def test_undecodable_meta_file_is_a_record_error(tmp_path):
    import shutil

    shutil.copytree(FIX / "vfhq", tmp_path / "vfhq")
    (tmp_path / "vfhq" / "Clip+Zz11Yy22Xx3+P0+C0+F0-50.txt").write_bytes(b"Video ID: \xff\xfe\xfa\n")
    b = build_manifest("vfhq", tmp_path / "vfhq")
    assert len(b.rows) == 2
    assert "can't decode" in reasons(b)["Clip+Zz11Yy22Xx3+P0+C0+F0-50.txt"]


def test_ids_that_differ_only_in_what_sanitising_removes_stay_distinct(tmp_path):
    clip = {"ytb_id": "Aa1Bb2Cc3Dd", "duration": {"start_sec": 1.0, "end_sec": 3.0},
            "bbox": {"top": 0.1, "bottom": 0.8, "left": 0.2, "right": 0.6}}
    import json

    (tmp_path / "celebvhq_info.json").write_text(json.dumps({"clips": {"x y": clip, "x/y": clip, "x_y": clip}}))
    b = build_manifest("celebvhq", tmp_path)
    ids = [r.clip_id for r in b.rows]
    assert len(set(ids)) == 3 and not b.errors, (ids, b.errors)
    assert "celebvhq_x_y" in ids  # already clean: unchanged
    assert all(i == "celebvhq_x_y" or (i.startswith("celebvhq_x_y-") and len(i) == len("celebvhq_x_y") + 11) for i in ids)
    assert all(sanitize_clip_id(i) == i for i in ids)  # idempotent: paths and keys made again agree


def test_long_ids_sharing_their_first_180_characters_stay_distinct():
    a, b = "v" * 200 + "a", "v" * 200 + "b"
    ids = {sanitize_clip_id(a), sanitize_clip_id(b)}
    assert len(ids) == 2 and all(len(i) <= 180 and sanitize_clip_id(i) == i for i in ids)


def test_a_repeated_id_is_reported_with_both_rows(tmp_path):
    from datasets_manifest.schema import ClipRow, read_manifest, write_manifest

    rows = [ClipRow(clip_id=c, dataset="t", source="x.mp4", identity="i") for c in ("a", "b", "a")]
    good, bad = read_manifest(write_manifest(rows, tmp_path / "m.parquet"))
    assert [r.clip_id for r in good] == ["a", "b"]
    (err,) = bad
    assert err.index == 2 and "duplicate clip_id 'a': row 0 has it too" in err.reason


@pytest.mark.parametrize("field, value", [("start_s", float("nan")), ("end_s", float("inf")), ("end_s", float("nan")),
                                          ("dataset", "../etc"), ("dataset", ""), ("dataset", "a b"),
                                          ("face_box", [0.0, 0.0, float("nan"), 5.0])])
def test_rows_with_non_finite_times_or_unsafe_dataset_names_are_malformed(field, value):
    from pydantic import ValidationError

    from datasets_manifest.schema import ClipRow

    good = dict(clip_id="c", dataset="t", source="x.mp4", identity="i", start_s=0.0, end_s=2.0)
    ClipRow(**good)
    with pytest.raises(ValidationError):
        ClipRow(**{**good, field: value})
