import numpy as np
import pytest

from or_agent.pipelines.preprocess import (
    ContentArea,
    ContentAreaTracker,
    InputSpec,
    crop_resize,
    detect_content_area,
    normalise,
    paste_back,
)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_fast_normalise_equals_the_definition(order):
    spec = InputSpec(64, 112, order, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    img = np.random.default_rng(0).integers(0, 256, (64, 112, 3), dtype=np.uint8)
    x = img[..., ::-1] if order == "RGB" else img
    expected = ((x.astype(np.float32) / 255 - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32))
    assert np.allclose(normalise(img, spec)[0], expected.transpose(2, 0, 1), atol=1e-5)
    assert np.allclose(normalise(img[None], spec), normalise(img, spec), atol=1e-5)



@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_normalise_is_opencvs_blob_to_the_bit(order):
    """The planar path replaced ``cv2.dnn.blobFromImage``: the models' inputs must not move by a bit."""
    import cv2

    spec = InputSpec(256, 448, order, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    img = np.random.default_rng(1).integers(0, 256, (256, 448, 3), dtype=np.uint8)
    blob = cv2.dnn.blobFromImage(img, 1.0, (448, 256), tuple(255.0 * m for m in spec.mean), swapRB=order == "RGB",
                                 ddepth=cv2.CV_32F)
    blob /= np.array([255.0 * s for s in spec.std], np.float32)[None, :, None, None]
    params = cv2.dnn.Image2BlobParams()
    params.scalefactor = tuple(1.0 / (255.0 * s) for s in spec.std) + (0.0,)
    params.mean = tuple(255.0 * m for m in spec.mean) + (0.0,)
    params.size, params.swapRB, params.ddepth = (448, 256), order == "RGB", cv2.CV_32F
    exact = cv2.dnn.blobFromImageWithParams(img, params)
    ours = normalise(img, spec)
    assert ours.shape == (1, 3, 256, 448) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.array_equal(ours, exact)
    assert np.allclose(ours, blob, atol=1e-5)
    batch = np.stack([img, img[::-1]])
    assert np.array_equal(normalise(batch, spec)[1], normalise(img[::-1], spec)[0])


def test_normalise_refuses_what_is_not_bgr_pixels():
    spec = InputSpec(4, 4, "RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"expected uint8 HxWx3 or NxHxWx3 pixels, got shape \(4, 4\) uint8"):
        normalise(np.zeros((4, 4), np.uint8), spec)
    with pytest.raises(ValueError, match="float32"):
        normalise(np.zeros((4, 4, 3), np.float32), spec)

def _scope(w=854, h=480, cx=430, cy=245, r=300, level=140):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[np.hypot(xx - cx, yy - cy) <= r] = level
    return img


def test_content_area_of_a_clipped_circle():
    a = detect_content_area(_scope())
    assert abs(a.cx - 430) < 4 and abs(a.cy - 245) < 6 and abs(a.radius - 300) < 6
    assert (a.x0, a.y0, a.x1, a.y1) == (int(np.floor(a.cx - a.radius)), 0, int(np.ceil(a.cx + a.radius)), 480)


def test_dark_frames_keep_the_previous_estimate():
    t = ContentAreaTracker(every=1)
    first = t.update(_scope())
    assert detect_content_area(np.zeros((480, 854, 3), np.uint8)) is None
    assert t.update(np.zeros((480, 854, 3), np.uint8)) == first  # the light went off: keep what we knew
    assert t.update(np.zeros((240, 320, 3), np.uint8)) == ContentArea.whole_frame(320, 240)  # new source size


def test_crop_and_paste_back_round_trip():
    area = ContentArea(400, 240, 300, 100, 0, 700, 480)
    img = np.zeros((480, 854, 3), np.uint8)
    img[:, 400:] = 255
    small = crop_resize(img, area, 64, 112)
    cmap = (small[..., 0] > 127).astype(np.uint8)
    full = paste_back(cmap, area, 854, 480)
    assert full[:, :100].max() == 0 and full[:, 700:].max() == 0
    assert full[200, 420] == 1 and full[200, 380] == 0


def test_fast_class_argmax_equals_numpy_argmax():
    from or_agent.pipelines.postprocess import class_argmax, reduce_logits

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((13, 64, 112)).astype(np.float32) * 3
    assert np.array_equal(class_argmax(logits), logits.argmax(0).astype(np.uint8))
    ties = np.round(logits).astype(np.float32)  # many equal logits: the lower class wins, as in argmax
    assert np.array_equal(class_argmax(ties), ties.argmax(0))
    assert np.array_equal(class_argmax(np.zeros((4, 3, 5), np.float32)), np.zeros((3, 5), np.uint8))
    assert np.array_equal(class_argmax(logits[:1]), np.zeros((64, 112), np.uint8))
    many = rng.standard_normal((256, 8, 9)).astype(np.float32)  # class ids up to 255, the uint8 map's last
    many[255, 0, 0] = 99.0
    assert np.array_equal(class_argmax(many), many.argmax(0)) and class_argmax(many)[0, 0] == 255
    class_map, counts, _ = reduce_logits(logits[None])
    assert np.array_equal(class_map, logits.argmax(0)) and counts.sum() == 64 * 112
    with pytest.raises(ValueError, match=r"expected \[C,H,W\] logits"):
        class_argmax(logits[0])


def test_class_counts_equal_numpys_bincount():
    from or_agent.pipelines.postprocess import class_counts

    rng = np.random.default_rng(5)
    cmap = rng.integers(0, 13, (256, 448)).astype(np.uint8)
    expected = np.bincount(cmap.ravel(), minlength=13)
    counts = class_counts(cmap, 13)
    assert counts.dtype == np.int64 and np.array_equal(counts, expected)
    assert np.array_equal(class_counts(cmap[::4, ::4], 13), np.bincount(cmap[::4, ::4].ravel(), minlength=13))
    assert np.array_equal(class_counts(cmap, 20), np.bincount(cmap.ravel(), minlength=20))  # absent classes: 0
    assert np.array_equal(class_counts(cmap, 5), expected[:5])  # ids beyond the classes asked for are not counted
    big = np.full((4097, 4097), 7, np.uint8)  # past float32's exact counts: counted by numpy
    assert class_counts(big, 8)[7] == 4097 * 4097
