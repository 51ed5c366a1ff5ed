"""Self-training of the real anatomy model: unlabelled Cholec80 key frames of the dissection phases, labelled
by an ensemble of trained ONNX models where the ensemble is sure and ignored (255) where it is not."""

import csv

import cv2
import numpy as np
import pytest

from or_agent.models.training.real.anatomy import CLASSES, IGNORE, TeacherEnsemble, list_unlabelled, pseudo_label

GALLBLADDER, PLATE = CLASSES.index("gallbladder"), CLASSES.index("cystic_plate")


def _colour_teacher(path, height, width):
    """A real ONNX model whose logits are a 1x1 convolution of the normalised RGB input: red pixels are
    gallbladder (probability 0.91), blue ones cystic plate (0.67), grey ones nothing in particular (0.18)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((len(CLASSES), 3, 1, 1), np.float32)
    bias = np.zeros(len(CLASSES), np.float32)
    weight[GALLBLADDER, 0] = 4.0  # input channel 0 is red (the models take RGB)
    weight[PLATE, 2] = 2.0
    bias[PLATE] = 0.3
    graph = helper.make_graph(
        [helper.make_node("Conv", ["frame", "w", "b"], ["logits"])], "colour_teacher",
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, len(CLASSES), height, width])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _key_frames(folder, rows):
    """A Cholec80 key-frame folder: images (red left third, blue middle, grey right) and phase.csv."""
    folder.mkdir(parents=True)
    frame = np.zeros((120, 180, 3), np.uint8)
    frame[:, :60] = (0, 0, 255)
    frame[:, 60:120] = (255, 0, 0)
    frame[:, 120:] = (127, 127, 127)
    with open(folder / "phase.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "second", "phase", "instruments", "several_phases"])
        for i, (phase, dark) in enumerate(rows):
            cv2.imwrite(str(folder / f"{i:06d}.jpg"), np.zeros_like(frame) if dark else frame,
                        [cv2.IMWRITE_JPEG_QUALITY, 100])
            out.writerow([f"{i:06d}.jpg", i, phase, "grasper", 0])
    return folder


def test_only_the_dissection_phases_frames_are_taken(tmp_path):
    a = _key_frames(tmp_path / "VID1", [("Preparation", False), ("CalotTriangleDissection", False),
                                        ("ClippingCutting", False), ("GallbladderPackaging", False)])
    b = _key_frames(tmp_path / "VID2", [("GallbladderDissection", False), ("CleaningCoagulation", False)])
    assert list_unlabelled([a, b]) == [a / "000001.jpg", a / "000002.jpg", b / "000000.jpg"]
    assert list_unlabelled([a], phases=("Preparation",)) == [a / "000000.jpg"]


def test_a_folder_without_its_phase_index_is_named(tmp_path):
    (tmp_path / "VID9").mkdir()
    with pytest.raises(FileNotFoundError, match="VID9: no phase.csv"):
        list_unlabelled([tmp_path / "VID9"])


@pytest.mark.parametrize("small_threshold, plate_label", [(None, IGNORE), (0.5, PLATE)])
def test_pseudo_labels_keep_what_the_teachers_are_sure_of(tmp_path, small_threshold, plate_label):
    folder = _key_frames(tmp_path / "VID1", [("CalotTriangleDissection", False), ("CalotTriangleDissection", True)])
    # two teachers at different input sizes: their probabilities meet at the frame's own size
    teachers = TeacherEnsemble([_colour_teacher(tmp_path / "a.onnx", 32, 48), _colour_teacher(tmp_path / "b.onnx", 64, 96)])
    pairs = pseudo_label(teachers, list_unlabelled([folder]), 0.7, say=lambda _: None, small_threshold=small_threshold,
                         save_dir=tmp_path / "masks")

    assert len(pairs) == 1  # the dark frame has no field of view to label
    crop, mask = pairs[0]
    assert crop.shape[:2] == mask.shape and mask.dtype == np.uint8
    h, w = mask.shape
    inner = (slice(8, h - 8),)
    assert np.all(mask[inner][:, 8:w // 3 - 8] == GALLBLADDER)
    assert np.all(mask[inner][:, w // 3 + 8:2 * w // 3 - 8] == plate_label)
    assert np.all(mask[inner][:, 2 * w // 3 + 8:w - 8] == IGNORE)
    assert np.array_equal(cv2.imread(str(tmp_path / "masks" / "VID1_000000.png"), cv2.IMREAD_UNCHANGED), mask)


def test_the_ensemble_averages_probabilities_over_models_and_mirror_images(tmp_path):
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, :16] = (0, 0, 255)
    frame[:, 16:] = (255, 0, 0)
    from or_agent.pipelines.preprocess import ContentArea

    area = ContentArea.whole_frame(64, 48)
    one = TeacherEnsemble([_colour_teacher(tmp_path / "a.onnx", 48, 64)], flip=False).probabilities(frame, area)
    assert one.shape == (48, 64, len(CLASSES))
    np.testing.assert_allclose(one.sum(2), 1.0, atol=1e-5)
    assert one[:, 2:14, GALLBLADDER].min() > 0.9 and one[:, 20:, PLATE].min() > 0.6
    # mirrored, the model sees the same colours at mirrored places, so a per-pixel model's mean is its own
    both = TeacherEnsemble([_colour_teacher(tmp_path / "a.onnx", 48, 64)] * 2, flip=True).probabilities(frame, area)
    np.testing.assert_allclose(both, one, atol=1e-5)
