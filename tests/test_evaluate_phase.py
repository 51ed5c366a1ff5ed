"""`or-agent evaluate phase`: a set's phase model scored on frames labelled with their phase, in time order."""

from __future__ import annotations

import csv
import json
import re
import shutil

import cv2
import numpy as np
import pytest

from or_agent.agent.offline.evaluate_phase import evaluate_phase
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.metrics import official_phase_scores
from or_agent.pipelines.surgery import PHASES
from or_agent.synth.dataset import read_phase_file
from tests.conftest import ROOT, run_cli

STEP = 10  # every 10th frame of the 25 fps synthetic video: key frames 0.4 s apart


@pytest.fixture(scope="module")
def labelled(small_dataset, tmp_path_factory):
    """Two "videos" of key frames from a synthetic surgery with their exact phase, in the CholecT50 key-frame
    layout (frames and phase.csv, with an extra column, as the real one has): every 10th frame from frame 0,
    and every 10th from frame 5."""
    out = tmp_path_factory.mktemp("phase-labelled")
    truth = read_phase_file(small_dataset / "video01-phase.txt")
    fps = json.loads((small_dataset / "video01.json").read_text())["fps"]
    writers = {}
    for name, offset in (("caseA", 0), ("caseB", 5)):
        (out / name).mkdir()
        fh = (out / name / "phase.csv").open("w", newline="")
        writers[name] = (csv.writer(fh), fh, offset)
        writers[name][0].writerow(["image", "second", "phase", "instruments"])
    cap = cv2.VideoCapture(str(small_dataset / "video01.mp4"))
    f = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        for name, (w, _, offset) in writers.items():
            if f % STEP == offset and f < len(truth):
                cv2.imwrite(str(out / name / f"{f:06d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
                w.writerow([f"{f:06d}.jpg", f"{f / fps:g}", PHASES[truth[f]], "grasper"])
        f += 1
    cap.release()
    for _, fh, _ in writers.values():
        fh.close()
    return out


def _rows(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _truth(folder):
    return {r["image"]: (float(r["second"]), r["phase"]) for r in _rows(folder / "phase.csv")}


def _strict_by_hand(truth: list[str], shown: list[str], phase: str) -> dict:
    t, p = np.array(truth) == phase, np.array(shown) == phase
    tp = int((t & p).sum())
    return {"precision": round(tp / p.sum(), 4) if p.any() else None, "recall": round(tp / t.sum(), 4) if t.any() else None,
            "jaccard": round(tp / (t | p).sum(), 4)}


def test_figures_match_the_predictions_written(labelled, tmp_path):
    out = tmp_path / "out"
    lines = []
    evaluation = evaluate_phase(labelled, "synthetic", out=out, log=lines.append)
    report = json.loads((out / "phase_eval.json").read_text())
    assert report == evaluation.report and not list(out.glob("*.part*"))
    assert "  caseA: 25/" in lines[0] and lines[-1] == f"wrote {out / 'predictions.csv'} and {out / 'phase_eval.json'}"
    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["video", "image", "second", "phase", "raw_phase", "confidence"]
    assert [v["video"] for v in report["videos"]] == ["caseA", "caseB"] and report["withheld"] is None
    pooled = []
    for v in report["videos"]:
        truth = _truth(labelled / v["video"])
        mine = [r for r in rows if r["video"] == v["video"]]
        assert [r["image"] for r in mine] == sorted(truth) and v["frames"] == len(truth)  # every frame, in time order
        assert all(float(r["second"]) == truth[r["image"]][0] and 0 <= float(r["confidence"]) <= 1 for r in mine)
        true = [truth[r["image"]][1] for r in mine]
        shown, raw = [r["phase"] for r in mine], [r["raw_phase"] for r in mine]
        pooled += true
        assert v["strict"]["accuracy"] == round(np.mean(np.array(shown) == true), 4)
        assert v["raw_accuracy"] == round(np.mean(np.array(raw) == true), 4)
        for phase, m in v["strict"]["per_phase"].items():
            assert {k: m[k] for k in ("precision", "recall", "jaccard")} == _strict_by_hand(true, shown, phase), phase
            assert m["frames"] == true.count(phase)
        ids = {name: i for i, name in enumerate(PHASES)}
        official = official_phase_scores(np.array([ids[p] for p in true]), np.array([ids[p] for p in shown]),
                                         np.array([float(r["second"]) for r in mine]), PHASES)
        assert v["official"]["accuracy"] == round(official["accuracy"], 4)
        assert v["official"]["per_phase"]["ClippingCutting"]["jaccard"] == round(
            official["per_phase"]["ClippingCutting"]["jaccard"], 4)
        # the synthetic model on its own kind of frames: right on most of them
        assert v["strict"]["accuracy"] > 0.8 and v["official"]["accuracy"] >= v["strict"]["accuracy"]
    majority = max(PHASES, key=pooled.count)
    assert report["majority_phase"] == majority
    for v in report["videos"]:
        true = [p for _, p in _truth(labelled / v["video"]).values()]
        assert v["majority_accuracy"] == round(true.count(majority) / len(true), 4)
    mean = report["mean"]
    assert mean["videos"] == 2
    assert mean["strict"]["accuracy"] == pytest.approx(np.mean([v["strict"]["accuracy"] for v in report["videos"]]), abs=1e-4)
    assert mean["official"]["jaccard"] is not None and mean["raw_accuracy"] is not None


def _withholding_set(tmp_path):
    """The synthetic set, copied, with its phase withheld from the display."""
    dst = tmp_path / "withholds"
    shutil.copytree(ROOT / "models" / "synthetic", dst)
    manifest = json.loads((dst / "model-set.json").read_text())
    manifest["withheld"] = {"phase": "its model is trained on synthetic video only"}
    (dst / "model-set.json").write_text(json.dumps(manifest))
    return dst


def test_the_command_prints_the_figures_and_notes_a_withheld_phase(labelled, tmp_path):
    proc = run_cli("evaluate", "phase", str(labelled / "caseA"), "--models", str(_withholding_set(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    frames = len(_rows(labelled / "caseA" / "phase.csv"))
    assert out[0] == f"  caseA: 25/{frames} frames"  # progress first, then the table
    header = next(line for line in out if not line.startswith("  caseA: "))
    assert re.fullmatch(rf"phase of set 'synthetic': {frames} frames in 1 videos; majority baseline: always [A-Za-z]+", header)
    assert any(line.startswith("  note: the set withholds this output from the display (its model is trained on "
                               "synthetic video only") for line in out)
    assert any(line.startswith("caseA (") for line in out) and any(line.startswith("mean over 1 videos") for line in out)
    assert sum(line.startswith("  frame accuracy: shown ") and "majority baseline" in line for line in out) == 2
    assert sum(line.startswith("  official accuracy ") for line in out) == 2
    assert any(line.startswith("  mean over phases") for line in out)


def test_a_variant_is_scored_in_place_of_the_sets_model_and_must_be_a_phase_model(labelled):
    own = evaluate_phase(labelled / "caseA", "synthetic", log=lambda s: None)
    same = evaluate_phase(labelled / "caseA", "synthetic", log=lambda s: None, variant=ROOT / "models" / "synthetic" / "phase")
    assert same.report["videos"] == own.report["videos"]
    with pytest.raises(InputError, match=r"not a variant of phase: a segmentation model with classes Background, "):
        evaluate_phase(labelled / "caseA", "synthetic", log=lambda s: None, variant=ROOT / "models" / "endoscapes" / "anatomy")


def _copy(labelled, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(labelled / "caseA", dst)
    return dst


@pytest.mark.parametrize("breakage, message", [
    ("no_phase_column", "{d}/phase.csv: no column 'phase' (expected image, second, phase)"),
    ("bad_second", "{d}/phase.csv:3: second 'abc' is not a time in seconds (a number >= 0)"),
    ("negative_second", "{d}/phase.csv:3: second '-4' is not a time in seconds (a number >= 0)"),
    ("short_row", "{d}/phase.csv:3: no phase (expected image, second, phase)"),
    ("unknown_phase", "{d}/phase.csv:3: unknown phase 'Suturing' (the phases of phase: " + ", ".join(PHASES) + ")"),
    ("missing_image", "{d}/phase.csv:3: image 'gone.jpg': no such file in {d}"),
    ("no_frames", "{d}/phase.csv: no frames listed"),
    ("corrupt_image", "{d}/{first}: not an image OpenCV can decode"),
])
def test_bad_input_is_a_one_line_error(labelled, tmp_path, breakage, message):
    d = _copy(labelled, tmp_path)
    csv_path = d / "phase.csv"
    lines = csv_path.read_text().splitlines()
    first = lines[1].split(",")[0]
    second_row = lines[2].split(",")
    if breakage == "no_phase_column":
        lines = [line.rsplit(",", 2)[0] + "," + line.rsplit(",", 1)[1] for line in lines]
    elif breakage == "bad_second":
        lines[2] = ",".join([second_row[0], "abc", *second_row[2:]])
    elif breakage == "negative_second":
        lines[2] = ",".join([second_row[0], "-4", *second_row[2:]])
    elif breakage == "short_row":
        lines[2] = ",".join(second_row[:2])
    elif breakage == "unknown_phase":
        lines[2] = ",".join([*second_row[:2], "Suturing", *second_row[3:]])
    elif breakage == "missing_image":
        lines[2] = ",".join(["gone.jpg", *second_row[1:]])
    elif breakage == "no_frames":
        lines = lines[:1]
    else:
        (d / first).write_bytes(b"not a jpeg")
    csv_path.write_text("\n".join(lines) + "\n")
    proc = run_cli("evaluate", "phase", str(d), "--models", "synthetic")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"or-agent: error: {message.format(d=d, first=first)}"


def test_folders_and_sets_that_cannot_be_evaluated_are_named(tmp_path):
    proc = run_cli("evaluate", "phase", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"or-agent: error: {tmp_path / 'nothing'}: no such directory"
    (tmp_path / "empty").mkdir()
    proc = run_cli("evaluate", "phase", str(tmp_path / "empty"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"or-agent: error: {tmp_path / 'empty'}: no phase.csv in it or in its folders (a folder of frames with phase.csv: "
        "image, second, phase; or a folder of such folders, one per video)")
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "synthetic" / "anatomy", models / "anatomy")
    (tmp_path / "video").mkdir()
    (tmp_path / "video" / "phase.csv").write_text("image,second,phase\n")
    proc = run_cli("evaluate", "phase", str(tmp_path / "video"), "--models", str(models))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "or-agent: error: model set 'models' has no phase model (choose a set with one: --models)")


def test_on_the_real_cholect50_key_frames(real_data, tmp_path):
    folder = real_data / "cholect50-val"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    evaluation = evaluate_phase(folder, "synthetic", out=tmp_path, log=lambda s: None)
    report = json.loads((tmp_path / "phase_eval.json").read_text())
    assert report == evaluation.report
    videos = sorted(d.name for d in folder.iterdir() if (d / "phase.csv").is_file())
    assert [v["video"] for v in report["videos"]] == videos
    rows = _rows(tmp_path / "predictions.csv")
    for v in report["videos"]:
        truth = _truth(folder / v["video"])
        mine = [r for r in rows if r["video"] == v["video"]]
        assert len(mine) == v["frames"] == len(truth)
        shown = np.array([r["phase"] for r in mine])
        assert v["strict"]["accuracy"] == round(np.mean(shown == [truth[r["image"]][1] for r in mine]), 4)
    # VID75 has no CleaningCoagulation: undefined there, never 0
    vid75 = next(v for v in report["videos"] if v["video"] == "VID75")
    assert vid75["official"]["per_phase"]["CleaningCoagulation"] == {"precision": None, "recall": None, "jaccard": None,
                                                                    "frames": 0}
