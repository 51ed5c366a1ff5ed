"""`or-agent evaluate segmentation`: a set's segmentation model scored on a labelled folder."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from or_agent.agent.offline.evaluate import ENDOSCAPES_CLASSES, evaluate_segmentation
from or_agent.pipelines.errors import InputError
from or_agent.pipelines.model_set import load_model_set
from or_agent.pipelines.rules import load_rules
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def labelled(small_dataset, tmp_path_factory):
    """Frames of a synthetic surgery and their exact masks, in Endoscapes' folder format, with the
    synthetic set's classes listed (they are not Endoscapes')."""
    out = tmp_path_factory.mktemp("labelled")
    (out / "images").mkdir()
    (out / "masks").mkdir()
    masks = sorted((small_dataset / "masks" / "video01").glob("frame*.png"))[::8][:8]
    cap = cv2.VideoCapture(str(small_dataset / "video01.mp4"))
    wanted = {int(p.stem[5:]): p for p in masks}
    f = 0
    while wanted:
        ok, frame = cap.read()
        assert ok
        if f in wanted:
            cv2.imwrite(str(out / "images" / f"v01_{f:06d}.png"), frame)
            shutil.copy(wanted.pop(f), out / "masks" / f"v01_{f:06d}.png")
        f += 1
    cap.release()
    names = [lab.name for lab in load_model_set("synthetic").model("segmentation").labels]
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    return out


def test_scores_the_synthetic_model_on_its_own_kind_of_frames(labelled, tmp_path):
    scores = evaluate_segmentation(labelled, "synthetic", out=tmp_path / "out", log=lambda s: None)
    assert scores.frames == 8 and scores.model == "anatomy" and len(scores.iou) == 13
    # the reference model scores 0.83 mean IoU on held-out synthetic surgeries
    assert 0.6 < scores.mean_iou <= 1.0 and 0.7 < scores.mean_dice <= 1.0
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in scores.iou)
    maps = sorted((tmp_path / "out" / "class_maps").glob("*.png"))
    assert [p.name for p in maps] == sorted(p.name for p in (labelled / "masks").iterdir())
    pred = cv2.imread(str(maps[0]), cv2.IMREAD_UNCHANGED)
    truth = cv2.imread(str(labelled / "masks" / maps[0].name), cv2.IMREAD_UNCHANGED)
    assert pred.shape == truth.shape and (pred == truth).mean() > 0.7
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("image,area_black_background,area_abdominal_wall") and len(rows) == 9
    assert abs(sum(float(v) for v in rows[1].split(",")[1:]) - 1.0) < 1e-3
    # the set's distance rule, judged on every frame on the model's maps and on the truth
    (near,) = scores.conditions
    assert (near.rule, near.classes, near.threshold_px) == ("energy_near_cystic_duct", ("L-hook Electrocautery", "Cystic Duct"), 20.0)
    assert near.on_model - near.false_alarms == near.on_truth - near.missed >= 0  # both held on the same frames
    assert 0 <= near.false_alarms <= near.on_model <= scores.frames
    # the synthetic model draws every class: every region counted is drawn, right or wrong
    d = scores.drawn
    assert d is not None and d.min_confidence == 0.0 and d.right + d.wrong > 0
    assert (d.right_drawn, d.wrong_drawn) == (d.right, d.wrong)


def test_the_command_prints_the_table(labelled):
    proc = run_cli("evaluate", "segmentation", str(labelled), "--models", "synthetic")
    assert proc.returncode == 0, proc.stderr
    assert "anatomy: 8 frames" in proc.stdout and "mean (without background)" in proc.stdout
    gate = next(r for r in load_rules() if r.id == "energy_near_cystic_duct").params["min_class_confidence"]
    assert (f"rule energy_near_cystic_duct (L-hook Electrocautery within 20 px of Cystic Duct, both at confidence >= {gate:g}): "
            "holds on the model's maps in ") in proc.stdout


def _copy(labelled, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(labelled, dst)
    return dst


def test_a_folder_labelled_with_other_classes_is_refused(labelled, tmp_path):
    d = _copy(labelled, tmp_path)
    (d / "classes.txt").unlink()
    with pytest.raises(InputError) as e:
        evaluate_segmentation(d, "synthetic", log=lambda s: None)
    assert str(e.value).startswith(f"{d}: labelled with {', '.join(ENDOSCAPES_CLASSES)}; model anatomy of set 'synthetic' "
                                   "has Black Background, ")


@pytest.mark.parametrize("breakage, message", [
    ("missing_mask", "masks/{name}.png: missing (every image needs its mask)"),
    ("small_mask", "masks/{name}.png: 10x10, its image is 854x480"),
    ("unknown_class", "masks/{name}.png: class ids 40 are not classes of anatomy (0..12, 255 ignored)"),
    ("corrupt_image", "images/{name}.png: not an image OpenCV can decode"),
])
def test_bad_folders_are_one_line_errors(labelled, tmp_path, breakage, message):
    d = _copy(labelled, tmp_path)
    name = sorted(p.stem for p in (d / "images").iterdir())[0]
    mask = d / "masks" / f"{name}.png"
    if breakage == "missing_mask":
        mask.unlink()
    elif breakage == "small_mask":
        cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    elif breakage == "unknown_class":
        m = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
        m[0, 0] = 40
        cv2.imwrite(str(mask), m)
    else:
        (d / "images" / f"{name}.png").write_bytes(b"not a png")
    proc = run_cli("evaluate", "segmentation", str(d), "--models", "synthetic")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"or-agent: error: {d}/{message.format(name=name)}"


def test_a_folder_without_images_and_masks_is_named(tmp_path):
    proc = run_cli("evaluate", "segmentation", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"or-agent: error: {tmp_path}: not a labelled segmentation folder "
                                   "(needs images/ and masks/, Endoscapes' format)")


def test_a_variant_is_scored_in_place_of_the_sets_model_and_must_have_its_classes(labelled, tmp_path):
    from tests.conftest import ROOT

    own = evaluate_segmentation(labelled, "synthetic", log=lambda s: None)
    same = evaluate_segmentation(labelled, "synthetic", log=lambda s: None, variant=ROOT / "models" / "synthetic" / "anatomy")
    assert np.allclose(same.iou, own.iou, equal_nan=True) and same.conditions == own.conditions
    with pytest.raises(InputError, match=r"not a variant of anatomy: a segmentation model with classes Background, Cystic Plate"):
        evaluate_segmentation(labelled, "synthetic", log=lambda s: None, variant=ROOT / "models" / "endoscapes" / "anatomy")
