"""Emulated ``pycuda.compiler``: the two kernels of pipelines/gpu/kernels.py, run with their reference
arithmetic on emulated device memory, taking the CUDA functions' exact arguments."""

import numpy as np

from pycuda.driver import device_bytes


def _preprocess_area(rows, pitch, x0, crop_w, crop_h, sx, sy, out, out_w, out_h, swap_rb, m0, m1, m2, k0, k1, k2,
                     **launch):
    import cv2

    pitch, x0, cw, ch, ow, oh = (int(v) for v in (pitch, x0, crop_w, crop_h, out_w, out_h))
    src = device_bytes(rows, pitch * (ch - 1) + (x0 + cw) * 3)
    crop = np.stack([src[r * pitch + x0 * 3:r * pitch + (x0 + cw) * 3] for r in range(ch)]).reshape(ch, cw, 3)
    # The area average, computed by OpenCV on float64 pixels (within 1e-5 of the exact weights of
    # area_resize_reference, and 10x faster, so the emulated box can play a clip live), then rounded
    # half to even like rintf in the CUDA source.
    if ow > cw or oh > ch:
        raise RuntimeError("emulated kernel: upscaling is not emulated")
    x = np.rint(cv2.resize(crop.astype(np.float64), (ow, oh), interpolation=cv2.INTER_AREA)) / 255.0
    if int(swap_rb):
        x = x[..., ::-1]
    x = (x - np.array([m0, m1, m2], np.float64)) * np.array([k0, k1, k2], np.float64)
    planar = np.ascontiguousarray(x.transpose(2, 0, 1).astype(np.float32))
    device_bytes(out, planar.nbytes)[:] = planar.reshape(-1).view(np.uint8)


def _reduce_logits(logits, C, H, W, sub, cls, counts, sub_counts, conf_sums, **launch):
    from or_agent.pipelines.postprocess import reduce_logits

    c, h, w, s = int(C), int(H), int(W), int(sub)
    lg = device_bytes(logits, 4 * c * h * w).view(np.float32).reshape(c, h, w)
    class_map, n, _ = reduce_logits(lg, s)
    device_bytes(cls, h * w)[:] = class_map.reshape(-1)
    grid_map, grid = class_map[::s, ::s], lg[:, ::s, ::s]
    top = np.take_along_axis(grid, grid_map[None].astype(np.int64), 0)[0]
    p_win = (1.0 / np.exp(grid - top[None]).sum(0)).astype(np.float32)
    for ptr, values in ((counts, n.astype(np.uint32)),
                        (sub_counts, np.bincount(grid_map.ravel(), minlength=c).astype(np.uint32)),
                        (conf_sums, np.bincount(grid_map.ravel(), weights=p_win.ravel(), minlength=c).astype(np.float32))):
        dst = device_bytes(ptr, 4 * c).view(values.dtype)
        dst += values  # the kernel atomically adds into zeroed counters


_KERNELS = {"preprocess_area": _preprocess_area, "reduce_logits": _reduce_logits}


class SourceModule:
    def __init__(self, source, options=None):
        self._source = source

    def get_function(self, name):
        if name not in _KERNELS or f"void {name}(" not in self._source:
            raise RuntimeError(f"emulated CUDA: no kernel {name!r} in the module")
        return _KERNELS[name]
