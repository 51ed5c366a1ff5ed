"""The reference networks: small, fully convolutional or recurrent by hand, and built only
from ops that ONNX opset 17 and TensorRT both support (Conv, BatchNorm folded at export,
Relu, Resize, Concat, Gemm, Sigmoid, Tanh, Mul, Add, GlobalAveragePool, ReduceMax)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

N_PHASES = 7
N_ANATOMY = 13
PHASE_STATE = 64


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, 1, padding=dilation, dilation=dilation, groups=cin, bias=False),
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class AnatomyNet(nn.Module):
    """Encoder to 1/8 with dilated separable blocks; decoder with skips at 1/4 and 1/2."""

    def __init__(self, classes: int = N_ANATOMY):
        super().__init__()
        self.s2 = conv_bn(3, 16, 2)
        self.s4 = nn.Sequential(conv_bn(16, 32, 2), separable(32, 32))
        self.s8 = nn.Sequential(conv_bn(32, 64, 2), separable(64, 64), separable(64, 64, 2),
                                separable(64, 64, 4), separable(64, 64, 8))
        self.reduce8 = nn.Sequential(nn.Conv2d(64, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.fuse4 = separable(64, 32)
        self.fuse2 = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                   separable(16, 16))
        self.classify = nn.Conv2d(16, classes, 1)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        f2 = self.s2(frame)
        f4 = self.s4(f2)
        f8 = self.s8(f4)
        x = self.fuse4(torch.cat([up2(self.reduce8(f8)), f4], 1))
        x = self.fuse2(torch.cat([up2(x), f2], 1))
        return up2(self.classify(x))


class FrameEncoder(nn.Module):
    """Whole-frame features: average and max pooled, so small instruments still count."""

    def __init__(self, width: int = 96):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 16, 2), conv_bn(16, 32, 2), separable(32, 32),
                                  conv_bn(32, 64, 2), separable(64, 64), conv_bn(64, width, 2), separable(width, width))
        self.features = 2 * width

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        x = self.body(frame)
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1)


class PhaseNet(nn.Module):
    """One streaming step: (frame, state) -> (phase logits, new state).

    The GRU cell is written out with Linear layers so that the exported graph is plain Gemm
    and element-wise ops, which every runtime accepts, and the state is an explicit tensor the
    caller carries between steps (no future frames are ever seen).
    """

    def __init__(self, hidden: int = PHASE_STATE):
        super().__init__()
        self.encoder = FrameEncoder()
        self.frame_head = nn.Linear(self.encoder.features, N_PHASES)  # used to pre-train the encoder
        f = self.encoder.features
        self.hidden = hidden
        self.gates_x = nn.Linear(f, 3 * hidden)
        self.gates_h = nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden + f, N_PHASES)

    def step(self, feat: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gx = self.gates_x(feat)
        gh = self.gates_h(state)
        h = self.hidden
        r = torch.sigmoid(gx[:, :h] + gh[:, :h])
        z = torch.sigmoid(gx[:, h:2 * h] + gh[:, h:2 * h])
        n = torch.tanh(gx[:, 2 * h:] + r * gh[:, 2 * h:])
        new_state = (1 - z) * n + z * state
        return self.head(torch.cat([new_state, feat], 1)), new_state

    def forward(self, frame: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(self.encoder(frame), state)


class VisibilityNet(nn.Module):
    """Tiny classifier: logits for (out_of_body, low_visibility), independent sigmoids. The defaults are
    the synthetic set's; the real-footage model is wider and deeper (``models/training/real/visibility.py``)."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 48), blocks: int = 1):
        super().__init__()
        a, b, c = widths
        self.body = nn.Sequential(conv_bn(3, a, 2), conv_bn(a, b, 2), conv_bn(b, c, 2), *(separable(c, c) for _ in range(blocks)))
        self.head = nn.Linear(2 * c, 2)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        x = self.body(frame)
        return self.head(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1))
