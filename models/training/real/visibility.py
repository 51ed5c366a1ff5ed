"""The visibility model (the pipeline's gate) for real footage: out of body and low visibility.

    OMP_NUM_THREADS=1 ./dev python -m or_agent.models.training.real.visibility

(the real frames are read with ``models.training.real_phase.data``).
Measured on the 2-core development machine (1 torch thread, other people's training on the machine):
9.8 min from an empty cache (``/usr/bin/time``: 9:52): the two training runs (1000 steps) 3.8 min
each, rendering the synthetic frames, reading the real ones and measuring both models the rest.

What it does, in order:

1. Data. Synthetic surgeries rendered by the generator (``synth``), frame by frame without writing
   video: 100 frames of each of the training split's 12 surgeries (``synth.splits.TRAIN``: in-body
   frames, frames in smoke events, out-of-body room scenes), the room scenes of 16 more surgeries
   (seed 11: more rooms), and 110 frames of each of the held-out split's 3 surgeries (``HELD_OUT``),
   written as PNGs under ``.cache/real-visibility/`` so that ``or-agent evaluate visibility`` reads
   them as files. Real frames: every real source through ``load_all`` (``.cache/real-phase/``: the
   agent's crops of cholect50-val, the 4 cholect50 clips at 2 fps, the video01 clip and frames,
   Endoscapes-Seg50). The real smoke frames (``smoke/``: 3 smoky, 25 clear) are never trained on.
   Out of body: the synthetic room scenes (recoloured, blurred, cropped at random: rooms differ) are
   the only positives; every real frame and every synthetic in-body frame is a negative.
   Low visibility: the generator's smoke flag on synthetic frames, and smoke and blur rendered onto
   real and synthetic in-body frames (``add_smoke``: clouds or plumes of low-frequency noise
   alpha-blended toward a bright, desaturated, slightly tissue-tinted grey, the detail under them
   softened; ``add_blur``: defocus or motion blur), labelled by how much of the view they take, with a
   band of in-between strengths left out of the loss. The frames known to be clear teach "clear"
   fully: the synthetic ones and Endoscapes' (picked as clear views); the Cholec80/CholecT50 frames,
   which show smoke now and then, teach it with a quarter of the weight.
2. A held-out run: trained without Endoscapes' val videos, cholect50-val VID75 and two of the clips
   (video05, a view from inside a trocar; video15, packaging and cleaning), then measured with
   ``or-agent evaluate visibility``'s own code on those files (every frame of the clips), the smoke
   frames and the synthetic held-out surgeries.
3. The shipped model: the same recipe on everything, exported (ONNX opset 17, static 1x3x64x112
   input ``frame``, output ``visibility_logits`` [1, 2]: independent logits for out of body and low
   visibility, as the synthetic model's) to ``models/endoscapes/visibility/`` with its manifest
   (licence, datasets, the command, both runs' figures, sha256), measured on every real frame (all
   but the smoke frames trained on, which the manifest says) and on the synthetic held-out surgeries.

Licence: trained on Endoscapes and Cholec80/CholecT50 frames (CC BY-NC-SA 4.0), so the weights are
for non-commercial research, share-alike; the smoke frames (CC BY-NC 4.0) are only evaluated on.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from or_agent.models.training.samples import VISIBILITY_SIZE
from or_agent.pipelines.manifest import sha256_of
from or_agent.synth.dataset import SynthConfig
from or_agent.synth.render import GENERATOR_VERSION, SurgeryRenderer
from or_agent.synth.splits import HELD_OUT, TRAIN
from or_agent.synth.textures import smooth_noise
from or_agent.synth.timeline import sample_timeline

REPO = Path(__file__).resolve().parents[3]
CACHE = REPO / ".cache" / "real-visibility"
OUT_DIR = REPO / "models" / "endoscapes" / "visibility"
ROOMS = SynthConfig(videos=16, seed=11, time_scale=25.0)  # out-of-body room scenes only: more rooms than TRAIN has
HEIGHT, WIDTH = VISIBILITY_SIZE  # the synthetic model's: a drop-in replacement (96x168 did no better on real smoke)
COMMAND = "OMP_NUM_THREADS=1 python -m or_agent.models.training.real.visibility"
# held out in the first run: Endoscapes' val videos, one cholect50-val video, two clips' source videos
HELD_OUT_VAL_VIDEO = "VID75"
HELD_OUT_CLIP_VIDEOS = ("video05", "video15")
# Rendered smoke counts as low visibility when it takes this much of the view (mean opacity), or
# covers this share of the frame densely (opacity >= 0.5); it counts as clear below the lower marks.
# In between it is left out of the loss: light haze is not what the gate should call low visibility.
SMOKE_LOW_VIS = (0.08, 0.05)
SMOKE_CLEAR = (0.03, 0.01)
# Blur, as the Gaussian sigma (or half the motion length) in model pixels (64x112: 1 px is ~5 px of a 854x480 frame)
BLUR_LOW_VIS = 1.6
BLUR_CLEAR = 0.7
SMOKE_LAYERS = 512
EMA_DECAY = 0.99
# How much a Cholec80/CholecT50 frame teaches "clear": left out (0), they let the model call a third of
# a clear real clip low visibility; at full weight, the real smoke they hold now and then teaches it
# to overlook real smoke.
PROBABLY_CLEAR_WEIGHT = 0.25
WIDTHS, BLOCKS = (24, 48, 96), 3  # VisibilityNet's: the synthetic model's is (16, 32, 48), 1


# --------------------------------------------------------------------------------------------
# synthetic frames
# --------------------------------------------------------------------------------------------

@dataclass
class Frames:
    """Crops at the model's size (uint8 BGR) with their labels; -1 = not labelled (left out of the loss)."""

    images: np.ndarray
    out_of_body: np.ndarray  # float32 0/1
    low_visibility: np.ndarray  # float32 0/1, or -1
    video: np.ndarray  # int: which surgery

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def concat(parts: list[Frames]) -> Frames:
        return Frames(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("images", "out_of_body", "low_visibility", "video")))

    def take(self, keep: np.ndarray) -> Frames:
        return Frames(self.images[keep], self.out_of_body[keep], self.low_visibility[keep], self.video[keep])


def prepare(frame: np.ndarray) -> np.ndarray:
    """The agent's crop at the model's size."""
    from or_agent.pipelines.preprocess import ContentArea, crop_resize, detect_content_area

    h, w = frame.shape[:2]
    return crop_resize(frame, detect_content_area(frame) or ContentArea.whole_frame(w, h), HEIGHT, WIDTH)


def _pick(rng: np.random.Generator, frames: list[int], count: int) -> list[int]:
    return sorted(rng.choice(frames, size=min(count, len(frames)), replace=False).tolist()) if frames else []


def render_synthetic(cfg: SynthConfig, per_video: dict[str, int], write_to: Path | None = None, log=print) -> Frames:
    """Frames of ``cfg``'s surgeries, rendered as ``or-agent synth`` renders them: up to ``per_video[kind]``
    frames of each kind (``out_of_body``, ``smoke``, ``blur``: frames inside such an event; ``clear``:
    in-body frames outside every event), picked at random. Labels are the generator's flags (smoke:
    density >= 0.3); a frame whose only flag is blur is left unlabelled for low visibility, since the
    generator's blur threshold (sigma 2.5 px of 854) is below what a 64x112 input resolves. With
    ``write_to``, each frame is also written there as a PNG, in a folder per kind."""
    parts = []
    for k in range(cfg.videos):
        index = cfg.first_index + k
        seed = cfg.video_seed(index)
        rng = np.random.default_rng(seed)
        tl = sample_timeline(rng, fps=cfg.fps, time_scale=cfg.time_scale)
        renderer = SurgeryRenderer(tl, seed=seed + 1, width=cfg.width, height=cfg.height)
        by_kind: dict[str, list[int]] = {kind: [] for kind in ("out_of_body", "smoke", "blur")}
        clear = []
        for f in range(tl.frames):
            active = [kind for kind in by_kind if tl.active(kind, f) is not None]
            for kind in active:
                by_kind[kind].append(f)
            if not active and tl.active("bleeding", f) is None:
                clear.append(f)
        pick = np.random.default_rng(seed + 7)
        chosen = {kind: _pick(pick, frames, per_video.get(kind, 0)) for kind, frames in by_kind.items()}
        chosen["clear"] = _pick(pick, clear, per_video.get("clear", 0))
        imgs, oob, low = [], [], []
        for frames in chosen.values():
            for f in frames:
                r = renderer.render(f)
                imgs.append(prepare(r.image))
                oob.append(float(r.out_of_body))
                low.append(-1.0 if r.out_of_body or (r.blur and not r.smoke) else float(r.smoke))
                if write_to is not None:
                    folder = write_to / ("out-of-body" if r.out_of_body else "smoky" if r.smoke else
                                         "blurred" if r.blur else "in-body")
                    folder.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(folder / f"video{index:02d}_{f:06d}.png"), r.image)
        parts.append(Frames(np.array(imgs, np.uint8).reshape(-1, HEIGHT, WIDTH, 3), np.array(oob, np.float32),
                            np.array(low, np.float32), np.full(len(imgs), index)))
        log(f"  rendered seed {cfg.seed} video {index:02d}: " + ", ".join(f"{len(v)} {k}" for k, v in chosen.items()))
    return Frames.concat(parts)


def synthetic(cfg: SynthConfig, per_video: dict[str, int], write: bool = False, log=print) -> Frames:
    """``render_synthetic``, cached under ``.cache/real-visibility/`` by its parameters."""
    key = (f"synth-seed{cfg.seed}-n{cfg.videos}-x{cfg.time_scale:g}-g{GENERATOR_VERSION}-"
           + "-".join(f"{k}{v}" for k, v in sorted(per_video.items())) + f"-{HEIGHT}x{WIDTH}")
    path = CACHE / f"{key}.npz"
    if path.exists() and (not write or (CACHE / key / "COMPLETE").exists()):
        z = np.load(path)
        return Frames(z["images"], z["out_of_body"], z["low_visibility"], z["video"])
    frames = render_synthetic(cfg, per_video, CACHE / key if write else None, log)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=frames.images, out_of_body=frames.out_of_body, low_visibility=frames.low_visibility,
             video=frames.video)
    if write:
        (CACHE / key / "COMPLETE").write_text("")
    return frames


def synthetic_folder(cfg: SynthConfig, per_video: dict[str, int]) -> Path:
    return CACHE / (f"synth-seed{cfg.seed}-n{cfg.videos}-x{cfg.time_scale:g}-g{GENERATOR_VERSION}-"
                    + "-".join(f"{k}{v}" for k, v in sorted(per_video.items())) + f"-{HEIGHT}x{WIDTH}")


TRAIN_PICKS = {"out_of_body": 30, "smoke": 25, "clear": 45}
ROOM_PICKS = {"out_of_body": 10}
HELD_OUT_PICKS = {"out_of_body": 40, "smoke": 30, "clear": 40}


# --------------------------------------------------------------------------------------------
# real frames
# --------------------------------------------------------------------------------------------

def real_frames(held_out: bool) -> Frames:
    """Every real frame but the smoke ones (evaluation only), as in-body negatives; with ``held_out``
    the held-out videos are left out. Only the Endoscapes frames (picked as clear views) are known to
    be clear (0); the Cholec80/CholecT50 frames are mostly clear but show smoke now and then, so they
    are marked -1 and teach "clear" with the weight ``PROBABLY_CLEAR_WEIGHT`` (``train``)."""
    from or_agent.models.training.real_phase.data import load_all

    sets = load_all(HEIGHT, WIDTH, ("val", "clips", "video01", "endoscapes"))
    keep = {
        "val": sets["val"].group != HELD_OUT_VAL_VIDEO,
        "clips": ~np.isin(sets["clips"].group, HELD_OUT_CLIP_VIDEOS),
        "video01": np.ones(len(sets["video01"].group), bool),
        "endoscapes": sets["endoscapes"].extra["split"] != "val",
    }
    parts = []
    for i, (name, fs) in enumerate(sets.items()):
        k = keep[name] if held_out else np.ones(len(fs.images), bool)
        n = int(k.sum())
        low = np.full(n, 0.0 if name == "endoscapes" else -1.0, np.float32)
        parts.append(Frames(fs.images[k], np.zeros(n, np.float32), low, np.full(n, 1000 + i)))
    return Frames.concat(parts)


# --------------------------------------------------------------------------------------------
# rendered smoke and blur
# --------------------------------------------------------------------------------------------

@dataclass
class SmokeLayer:
    """A cloud of smoke at the model's size: its opacity and the grain of its light."""

    alpha: np.ndarray  # H,W float32 in [0, 1)
    grain: np.ndarray  # H,W float32 around 1

    @property
    def mean_opacity(self) -> float:
        return float(self.alpha.mean())

    @property
    def dense_share(self) -> float:
        """The share of the frame the smoke covers at opacity >= 0.5."""
        return float((self.alpha >= 0.5).mean())


def plumes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Value noise in [-1, 1] stretched along a random direction: the streaks of a rising plume."""
    along, across = int(rng.integers(2, 4)), int(rng.integers(8, 20))
    coarse = rng.uniform(-1.0, 1.0, (along, across)).astype(np.float32)
    canvas = cv2.resize(coarse, (2 * w, 2 * w), interpolation=cv2.INTER_CUBIC)
    turn = cv2.getRotationMatrix2D((w, w), float(rng.uniform(0, 180)), 1.0)
    canvas = cv2.warpAffine(canvas, turn, (2 * w, 2 * w), borderMode=cv2.BORDER_REFLECT)
    y0, x0 = (2 * w - h) // 2, w // 2
    return np.clip(canvas[y0:y0 + h, x0:x0 + w], -1.0, 1.0)


def smoke_layer(rng: np.random.Generator, h: int = HEIGHT, w: int = WIDTH) -> SmokeLayer:
    """Clouds of low-frequency noise (the generator's ``smooth_noise``): a soft-edged shape cut from
    coarse noise, streaked by finer noise, at a random peak opacity."""
    cells = int(rng.integers(2, 6))
    shape = 0.65 * smooth_noise(rng, (h, w), cells) + 0.35 * smooth_noise(rng, (h, w), 2 * cells + 1)
    cut, soft = rng.uniform(-0.8, 0.5), rng.uniform(0.3, 1.2)
    # smoke is not a flat sheet: blotchy, or drawn out in plumes
    wisps = 0.75 + 0.25 * smooth_noise(rng, (h, w), 3 * cells) if rng.random() < 0.5 else 0.6 + 0.4 * plumes(rng, h, w)
    alpha = rng.uniform(0.25, 0.9) * np.clip((shape - cut) / soft, 0.0, 1.0) * wisps
    grain = 1.0 + 0.05 * smooth_noise(rng, (h, w), 3 * cells)
    return SmokeLayer(alpha.astype(np.float32), grain.astype(np.float32))


def add_smoke(rng: np.random.Generator, img: np.ndarray, layer: SmokeLayer) -> np.ndarray:
    """``layer`` on a uint8 BGR crop (flipped at random): alpha-blended toward a bright, desaturated
    grey tinted a little by the tissue (smoke scatters the scope's light), the detail under it softened."""
    alpha: np.ndarray = layer.alpha
    grain: np.ndarray = layer.grain
    if rng.random() < 0.5:
        alpha, grain = alpha[:, ::-1], grain[:, ::-1]
    if rng.random() < 0.5:
        alpha, grain = alpha[::-1], grain[::-1]
    grey = rng.uniform(190, 250)
    tissue = img.reshape(-1, 3).mean(0)
    t = rng.uniform(0.0, 0.25)
    colour = (1 - t) * grey + t * tissue  # BGR, mostly grey
    smoke = colour[None, None, :] * grain[..., None]
    a = alpha[..., None]
    sharp = img.astype(np.float32)
    soft = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.5)).astype(np.float32)
    under = sharp + (soft - sharp) * np.minimum(1.0, 3.0 * a)
    return np.clip(under * (1 - a) + smoke * a, 0, 255).astype(np.uint8)


def add_blur(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, float]:
    """Defocus (Gaussian) or motion blur on a uint8 BGR crop; returns the image and its strength
    (sigma, or half the motion length, in model pixels)."""
    strength = float(rng.uniform(0.3, 3.5))
    if rng.random() < 0.6:
        return cv2.GaussianBlur(img, (0, 0), strength), strength
    length = max(2, int(round(2 * strength)))
    line = np.zeros((length, length), np.float32)
    line[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    kernel = cv2.warpAffine(line, rot, (length, length))
    return cv2.filter2D(img, -1, np.divide(kernel, max(float(kernel.sum()), 1e-6), dtype=np.float32)), length / 2


def smoke_label(layer: SmokeLayer) -> float:
    """1 (low visibility), 0 (clear) or -1 (in between: left out of the loss)."""
    if layer.mean_opacity >= SMOKE_LOW_VIS[0] or layer.dense_share >= SMOKE_LOW_VIS[1]:
        return 1.0
    return 0.0 if layer.mean_opacity <= SMOKE_CLEAR[0] and layer.dense_share <= SMOKE_CLEAR[1] else -1.0


def degrade(rng: np.random.Generator, img: np.ndarray, smoke: list[SmokeLayer], p_smoke: float,
            p_blur: float) -> tuple[np.ndarray, float]:
    """Maybe smoke (one of the layers ``smoke``), maybe blur; the low-visibility label (1, 0, or -1
    when in the ambiguous band)."""
    label = 0.0
    u = rng.random()
    if u < p_smoke:
        layer = smoke[int(rng.integers(len(smoke)))]
        img, label = add_smoke(rng, img, layer), smoke_label(layer)
    elif u < p_smoke + p_blur:
        img, s = add_blur(rng, img)
        label = 1.0 if s >= BLUR_LOW_VIS else (0.0 if s <= BLUR_CLEAR else -1.0)
    return img, label


def recolour(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Hue, saturation and gamma changes: rooms differ in colour from the generator's few."""
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(0, 180))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.6), 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** rng.uniform(0.6, 1.6), 0, 255).astype(np.uint8)
    return cv2.LUT(out, lut)


def zoom(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A random crop of 55-100 % of the view, back to the model's size: content areas are found a
    little differently from frame to frame and from scope to scope, and some scopes fill the frame
    (no black corners)."""
    h, w = img.shape[:2]
    ch, cw = max(8, int(h * rng.uniform(0.55, 1.0))), max(8, int(w * rng.uniform(0.55, 1.0)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------

def train(data: dict[str, Frames], steps: int, seed: int, log=print):
    """VisibilityNet on mixed batches: real in-body frames (smoke or blur rendered on some), synthetic
    in-body frames (the same on the clear ones) and synthetic room scenes."""
    import torch
    from torch.nn import functional as F

    from or_agent.models.training.nets import VisibilityNet
    from or_agent.models.training.train import fit, jitter, to_tensor

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    real, synth_in, rooms = data["real"], data["synthetic_in_body"], data["rooms"]
    mix = (("real", real, 28), ("synthetic_in_body", synth_in, 20), ("rooms", rooms, 16))
    net = VisibilityNet(WIDTHS, BLOCKS)
    net.train()
    smoke = [smoke_layer(rng) for _ in range(SMOKE_LAYERS)]  # rendered once: a layer costs 100 blends

    # The exported weights are an exponential moving average of the trained ones: the last steps of a
    # small, noisy batch move a single snapshot's low-visibility boundary from run to run.
    ema = copy.deepcopy(net)

    def average() -> None:
        with torch.no_grad():
            for kept, p in zip(ema.parameters(), net.parameters()):
                kept.mul_(EMA_DECAY).add_(p.detach(), alpha=1 - EMA_DECAY)
            for kept, b in zip(ema.buffers(), net.buffers()):
                kept.copy_(b)

    def batch(step):
        if step:
            average()  # the weights the previous step left
        xs, y_oob, y_low, w_low = [], [], [], []
        for name, frames, count in mix:
            for i in rng.integers(0, len(frames), count):
                img, low = frames.images[i], float(frames.low_visibility[i])
                weight = 1.0
                if name == "rooms":
                    img = recolour(rng, img) if rng.random() < 0.7 else img
                    if rng.random() < 0.3:
                        img, _ = add_blur(rng, img)
                elif low == 0.0:
                    img, low = degrade(rng, img, smoke, 0.35, 0.15)
                elif name == "real":  # probably clear: "clear" teaches weakly, rendered smoke or blur fully
                    img, low = degrade(rng, img, smoke, 0.35, 0.15)
                    weight = 1.0 if low == 1.0 else PROBABLY_CLEAR_WEIGHT
                if rng.random() < 0.5:
                    img = img[:, ::-1]
                if rng.random() < 0.5:
                    img = zoom(rng, img)
                xs.append(img)
                y_oob.append(float(frames.out_of_body[i]))
                y_low.append(low)
                w_low.append(weight)
        x = jitter(rng, np.stack(xs))
        logits = net(to_tensor(torch, x))
        t_oob = torch.tensor(y_oob)
        t_low = torch.tensor(y_low)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], t_oob)
        known = t_low >= 0
        if known.any():
            loss = loss + F.binary_cross_entropy_with_logits(logits[known, 1], t_low[known], weight=torch.tensor(w_low)[known])
        return loss

    fit(torch, net.parameters(), steps, 3e-3, batch, "visibility", report_every=250)
    average()
    ema.eval()
    return ema


# --------------------------------------------------------------------------------------------
# export, measurement, manifest
# --------------------------------------------------------------------------------------------

def export_onnx(net, path: Path) -> None:
    import torch

    from or_agent.models.training.train import export

    path.parent.mkdir(parents=True, exist_ok=True)
    export(torch, net, (torch.zeros(1, 3, HEIGHT, WIDTH),), ["frame"], ["visibility_logits"], path)


def write_manifest(folder: Path, metrics: dict, wall_s: float) -> dict:
    """The manifest beside ``folder/model.onnx``: the synthetic visibility model's, with this model's
    name, licence, data, training and figures."""
    from or_agent.models.training.train import MODEL_SPECS

    doc = MODEL_SPECS["visibility"]()
    doc["input"]["shape"] = [1, 3, HEIGHT, WIDTH]
    doc.update({
        "name": "visibility-endoscapes",
        "sha256": sha256_of(folder / "model.onnx"),
        "license": "CC-BY-NC-SA-4.0",
        "datasets": [
            {"name": "Endoscapes2023 (Endoscapes-Seg50: 418 frames of 40 videos, train and val splits), as in-body frames",
             "license": "CC-BY-NC-SA-4.0",
             "attribution": "Murali et al., The Endoscapes Dataset for Surgical Scene Segmentation, Object Detection, and "
                            "Critical View of Safety Assessment, arXiv 2312.12429 (2023); CAMMA, University of Strasbourg / "
                            "IHU Strasbourg"},
            {"name": "Cholec80 / CholecT50 (CholecT50 validation key frames of VID68/70/73/75, 687 frames; 4 CholecT50 "
                     "clips of 32 s at 2 fps; Cholec80 video01's first 10 s and 20 frames), as in-body frames",
             "license": "CC-BY-NC-SA-4.0",
             "attribution": "Twinanda et al., EndoNet, IEEE TMI 36(1) 2017 (Cholec80); Nwoye et al., Rendezvous, Medical "
                            "Image Analysis 78 2022 (CholecT50); CAMMA, University of Strasbourg / IHU Strasbourg"},
            {"name": "laparoscopic smoke frames (3 smoky, 25 clear, 256x256): evaluation only, never trained on",
             "license": "CC-BY-NC-4.0",
             "attribution": "the surgical smoke frames distributed with the project's real test data (shared/data/real/smoke)"},
            {"name": f"or-agent synthetic laparoscopic cholecystectomies (or-agent synth: {TRAIN.videos} videos seed {TRAIN.seed} "
                     f"and the room scenes of {ROOMS.videos} videos seed {ROOMS.seed}, time scale 1/{TRAIN.time_scale:g})",
             "license": "Apache-2.0",
             "attribution": "procedurally rendered by or-agent's own generator (synth/); no patient data"},
        ],
        "training": {
            "data": ("out of body: the generator's operating-room scenes (positives) against every real frame and the "
                     "synthetic in-body frames; low visibility: the generator's smoke, and smoke (clouds, plumes) and blur "
                     "rendered onto real and synthetic in-body frames; the Cholec80/CholecT50 frames teach 'clear' with a "
                     "quarter of the weight (they show smoke now and then) (models/training/real/visibility.py)"),
            "command": f"{COMMAND}  (1 torch thread, {wall_s / 60:.1f} min on the 2-core development machine, "
                       "rendering and both runs included)",
            "trained_on": datetime.date.today().isoformat(),
            "not_for_clinical_use": ("research model (CC BY-NC-SA 4.0, non-commercial); out of body is learnt from "
                                     "synthetic room scenes only: no real out-of-body footage was available to train or "
                                     "measure it"),
        },
        "metrics": metrics,
    })
    (folder / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def real_groups(held_out: bool) -> dict[str, list[Path]]:
    """The real frames by group: the held-out videos only, or (None) everything, as evaluate's default."""
    import csv

    from or_agent.models.training.real_phase.data import real_root

    root = real_root()
    with open(root / "cholect50-clips" / "clips.csv") as fh:
        clips = [root / "cholect50-clips" / r["clip"] for r in csv.DictReader(fh) if r["cholec80_video"] in HELD_OUT_CLIP_VIDEOS]
    endo_val = root / "endoscapes-seg50" / "val" / "images"
    if not held_out:
        from or_agent.agent.offline.evaluate_visibility import default_groups

        return default_groups(root)[0]
    return {"in-body": [endo_val, root / "cholect50-val" / HELD_OUT_VAL_VIDEO, *clips],
            "clear": [root / "smoke" / "clear", endo_val], "smoky": [root / "smoke" / "smoky"]}


def figures(scores) -> dict:
    """The goals' figures of one ``evaluate_visibility`` run, for the manifest."""
    out: dict = {}
    keys = {"in-body": "out_of_body_false_positive_rate", "clear": "low_visibility_false_positive_rate_on_clear",
            "smoky": "smoke_recall", "out-of-body": "out_of_body_recall"}
    for r in scores.goals():
        if r.frames:
            out[keys[r.goal.group]] = round(r.rate, 4)
            out[f"{keys[r.goal.group]}_frames"] = r.frames
    frames, _, low = scores.totals("in-body")
    if frames:  # in-body frames are not all clear (the trocar clip, smoke): how often the gate warns on them
        out["low_visibility_rate_on_in_body"] = round(low / frames, 4)
    return out


def measure(model_dir: Path, held_out_real: bool, log=print) -> dict:
    from or_agent.agent.offline.evaluate_visibility import evaluate_visibility

    synth_dir = synthetic_folder(HELD_OUT, HELD_OUT_PICKS)
    real = evaluate_visibility(real_groups(held_out_real), model_dir, log=lambda m: None)
    synth = evaluate_visibility({"in-body": [synth_dir / "in-body"], "smoky": [synth_dir / "smoky"],
                                 "out-of-body": [synth_dir / "out-of-body"]}, model_dir, log=lambda m: None)
    for line in real.table() + synth.table():
        log(line)
    synth_fig = figures(synth)
    synth_fig["low_visibility_recall_on_smoke"] = synth_fig.pop("smoke_recall")
    return {"real": figures(real), "synthetic": synth_fig, "ms": real.ms_per_frame}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT_DIR), help="where model.onnx and manifest.json go")
    ap.add_argument("--skip-held-out", action="store_true", help="only train, export and measure the shipped model")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    log("data: synthetic renders (cached under .cache/real-visibility/) and the real frames")
    train_synth = synthetic(TRAIN, TRAIN_PICKS, log=log)
    rooms = synthetic(ROOMS, ROOM_PICKS, log=log)
    synthetic(HELD_OUT, HELD_OUT_PICKS, write=True, log=log)
    synth_in = train_synth.take(train_synth.out_of_body == 0)
    all_rooms = Frames.concat([train_synth.take(train_synth.out_of_body == 1), rooms])
    log(f"  synthetic: {len(synth_in)} in-body ({int((synth_in.low_visibility == 1).sum())} smoky), {len(all_rooms)} room scenes")
    metrics: dict = {}
    if not args.skip_held_out:
        real = real_frames(held_out=True)
        log(f"held-out run: {len(real)} real frames (held out: Endoscapes val, cholect50-val {HELD_OUT_VAL_VIDEO}, "
            f"clips of {', '.join(HELD_OUT_CLIP_VIDEOS)})")
        net = train({"real": real, "synthetic_in_body": synth_in, "rooms": all_rooms}, args.steps, args.seed, log)
        tmp = CACHE / "held-out-model"
        export_onnx(net, tmp / "model.onnx")
        write_manifest(tmp, {}, time.time() - t0)
        held = measure(tmp, held_out_real=True, log=log)
        metrics["held_out"] = ("model trained without Endoscapes-Seg50 val (75 frames, 10 videos), cholect50-val "
                               f"{HELD_OUT_VAL_VIDEO} and the clips of {' and '.join(HELD_OUT_CLIP_VIDEOS)} (every frame), "
                               "measured on those, on the smoke frames (never trained on) and on 3 held-out synthetic "
                               f"surgeries (seed {HELD_OUT.seed})")
        metrics["held_out_real"] = held["real"]
        metrics["held_out_synthetic"] = held["synthetic"]
    real = real_frames(held_out=False)
    log(f"shipped model: {len(real)} real frames")
    net = train({"real": real, "synthetic_in_body": synth_in, "rooms": all_rooms}, args.steps, args.seed, log)
    out = Path(args.out)
    export_onnx(net, out / "model.onnx")
    write_manifest(out, metrics, time.time() - t0)
    final = measure(out, held_out_real=False, log=log)
    from or_agent.models.training.real.anatomy import time_onnx

    wall = time.time() - t0
    metrics.update({
        "all_real": {**final["real"], "note": "every real frame; all but the smoke frames (smoke/) were trained on"},
        "synthetic_held_out": final["synthetic"],
        "out_of_body_false_positive_rate": final["real"]["out_of_body_false_positive_rate"],
        "low_visibility_false_positive_rate_on_clear": final["real"]["low_visibility_false_positive_rate_on_clear"],
        "smoke_recall": final["real"]["smoke_recall"],
        "out_of_body_recall": final["synthetic"]["out_of_body_recall"],
        "ms_per_frame_onnxruntime_cpu_1_thread": time_onnx(str(out / "model.onnx"), runs=300)["ms_median"],
    })
    write_manifest(out, metrics, wall)
    log(json.dumps(metrics, indent=1))
    log(f"done in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
