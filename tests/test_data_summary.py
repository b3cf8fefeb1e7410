"""``summarize``, its text form and the ``marreid data summary|verify`` commands."""

from __future__ import annotations

import json

from fakedata import make_market_tree, make_msmt_tree
from marreid.cli import main
from marreid.data import ReidDataset, Sample, format_summary, load_dataset, summarize


def test_summarize_counts_by_hand():
    ds = ReidDataset(
        "x",
        "/r",
        train=[Sample("a", 4, 0), Sample("b", 4, 1), Sample("c", 9, 1)],
        query=[Sample("d", 5, 2)],
        gallery=[Sample("e", 5, 0), Sample("f", 0, 0), Sample("g", 0, 3), Sample("h", 6, 1)],
        junk=7,
    )
    assert summarize(ds) == {
        "train": {"images": 3, "ids": 2, "cams": 2},
        "query": {"images": 1, "ids": 1, "cams": 1},
        "gallery": {"images": 4, "ids": 3, "cams": 3, "junk": 7, "distractors": 2},
    }


def test_identity_zero_with_queries_is_a_person_not_a_distractor(tmp_path):
    make_msmt_tree(tmp_path, ids=2, cams=2, per_id=2)
    counts = summarize(load_dataset(None, tmp_path))
    # MSMT17's test identities start at 0: ids 0 and 1 each have 2 gallery images
    assert counts["gallery"] == {"images": 4, "ids": 2, "cams": 2, "junk": 0, "distractors": 0}


def test_summary_json_exactly(tmp_path, capsys):
    make_market_tree(tmp_path, ids=4, cams=2, per_id=2, junk=2, distractors=3)
    assert main(["data", "summary", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    # train: ids 1-4 x 2 images; query: ids 5-8 x 1; gallery: ids 5-8 x 2 + 3 of id 0, 2 junk left out
    assert json.loads(out) == {
        "train": {"images": 8, "ids": 4, "cams": 2},
        "query": {"images": 4, "ids": 4, "cams": 2},
        "gallery": {"images": 11, "ids": 5, "cams": 2, "junk": 2, "distractors": 3},
    }
    assert list(json.loads(out)) == ["train", "query", "gallery"]
    assert out.count("\n") == 1


def test_summary_text(tmp_path, capsys):
    tree = make_market_tree(tmp_path, style="duke", ids=2, cams=3, per_id=3, junk=0, distractors=0)
    assert main(["data", "summary", "--format", "dukemtmc", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"dukemtmc at {tmp_path}"
    assert out[2].split() == ["train", "6", "2", "3"]
    assert out[4].split() == ["gallery", "6", "2", "3"]
    assert tree.counts("gallery") == {"images": 6, "ids": 2, "cams": 3}


def test_format_summary_by_hand():
    counts = {
        "train": {"images": 12936, "ids": 751, "cams": 6},
        "query": {"images": 3368, "ids": 750, "cams": 6},
        "gallery": {"images": 15913, "ids": 751, "cams": 6, "junk": 3819, "distractors": 2798},
    }
    assert format_summary(counts, "market1501 at /d").splitlines() == [
        "market1501 at /d",
        "split      images    ids  cams",
        "train      12,936    751     6",
        "query       3,368    750     6",
        "gallery    15,913    751     6",
        "gallery: 3,819 junk images left out (id -1), 2,798 distractors kept (id 0)",
    ]


def test_summary_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "summary", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "missing") in err
    assert main(["data", "summary", "--format", "viper", str(tmp_path)]) == 2
    assert "market1501" in capsys.readouterr().err


def test_summary_pattern_option(tmp_path, capsys):
    tree = make_market_tree(tmp_path, ids=2, cams=2, per_id=2, junk=0, distractors=0)
    flat = tmp_path / "bounding_box_train"
    assert main(["data", "summary", str(flat), "--pattern", r"(?P<pid>\d{4})_c(?P<cam>\d)", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"] == tree.counts("train")


def test_verify_lists_each_bad_image(tmp_path, capsys):
    make_market_tree(tmp_path, ids=2, per_id=2, junk=1, distractors=1)
    assert main(["data", "verify", str(tmp_path)]) == 0
    assert "all 11 images" in capsys.readouterr().out
    garbage = tmp_path / "query" / "0003_c1s1_009999_00.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    good = sorted((tmp_path / "bounding_box_train").iterdir())[0]
    truncated = tmp_path / "bounding_box_train" / "0001_c1s1_009998_00.jpg"
    truncated.write_bytes(good.read_bytes()[:-40])
    assert main(["data", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    bad_lines = [line for line in err if line.startswith("bad image")]
    assert sorted(line.split()[2].rstrip(":") for line in bad_lines) == sorted([str(truncated), str(garbage)])
    assert err[-1] == "2 of 13 images cannot be read"
