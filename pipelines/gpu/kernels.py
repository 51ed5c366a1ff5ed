"""Two pycuda kernels that keep the per-frame work on the GPU, and their numpy references.

**Preprocessing** (``GpuPreprocessor``): one pass from the uint8 BGR HxWx3 frame on the device
(1080p or 4K) to the model's float32 NCHW input: crop to the content area ``(x0, y0, x1, y1)``,
resize, optional BGR->RGB, ``(x/255 - mean)/std``, planar. Only the crop's rows are copied to the
device (a 2-D copy of the crop rectangle). The resize is **area averaging rounded to whole grey
levels**: each output pixel is the mean of the source rectangle it covers, edge pixels weighted by
their covered fraction, rounded half to even. For downscaling, which is every real case (a 1080p or
4K crop to a few hundred pixels), that is exactly what OpenCV's ``INTER_AREA`` computes on the CPU
path (``crop_resize`` + ``normalise``), so the models see the input they were trained and measured
on. ``preprocess_reference`` is the same arithmetic in numpy (float64). The only differences come from
a mean that lies within float rounding of half a grey level: one grey level, on rare values (the
numpy reference differs from INTER_AREA on none of the 1080p/4K/480p test frames; the GPU's share is
what ``bench.gpu_check`` prints). ``grey_level_differences`` measures them; ``same_input`` is the
check the tests and ``bench.gpu_check`` apply. Upscaling (a crop smaller than the model input) is area averaging too,
which is *not* what INTER_AREA does there (it interpolates); no equality is claimed for that case.

**Segmentation reduction** (``GpuLogitsReducer``): logits [C,H,W] on the device -> uint8 class map
(argmax, first maximum wins like numpy), per-class pixel counts (shared-memory histogram per block,
then ``atomicAdd`` into a C-sized array), and the per-class confidence that ``SegmentationStage`` reports
(mean max-softmax probability on the 4x4-subsampled grid). Only the class map (H*W bytes) and three
C-sized arrays come back.

Nothing here imports pycuda until a class is instantiated; then ``DependencyError`` if absent.
Both classes own device memory and a stream: call ``close()`` (or use ``with``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from or_agent.pipelines.gpu.context import CudaContext
from or_agent.pipelines.postprocess import CONF_SUBSAMPLE, class_confidence, reduce_logits
from or_agent.pipelines.preprocess import ContentArea, InputSpec

_PREPROCESS_SRC = r"""
__global__ void preprocess_area(const unsigned char* __restrict__ rows, int pitch, int x0,
                                int crop_w, int crop_h, float sx, float sy,
                                float* __restrict__ out, int out_w, int out_h, int swap_rb,
                                float m0, float m1, float m2, float k0, float k1, float k2)
{
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= out_w || oy >= out_h) return;
    const float fx0 = ox * sx, fx1 = fx0 + sx, fy0 = oy * sy, fy1 = fy0 + sy;
    const int ix0 = max(0, (int)floorf(fx0)), ix1 = min(crop_w, (int)ceilf(fx1));
    const int iy0 = max(0, (int)floorf(fy0)), iy1 = min(crop_h, (int)ceilf(fy1));
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, wsum = 0.f;
    for (int iy = iy0; iy < iy1; ++iy) {
        const float wy = fminf(fy1, (float)(iy + 1)) - fmaxf(fy0, (float)iy);
        if (wy <= 0.f) continue;
        const unsigned char* row = rows + (size_t)iy * pitch + (size_t)x0 * 3;
        float r0 = 0.f, r1 = 0.f, r2 = 0.f, rw = 0.f;
        for (int ix = ix0; ix < ix1; ++ix) {
            const float wx = fminf(fx1, (float)(ix + 1)) - fmaxf(fx0, (float)ix);
            if (wx <= 0.f) continue;
            const unsigned char* p = row + ix * 3;
            r0 += wx * p[0]; r1 += wx * p[1]; r2 += wx * p[2]; rw += wx;
        }
        a0 += wy * r0; a1 += wy * r1; a2 += wy * r2; wsum += wy * rw;
    }
    // Rounded to whole grey levels before normalising, as OpenCV's INTER_AREA (uint8 out) does on
    // the CPU path the models were trained and measured with; rintf rounds half to even, like cvRound.
    const float inv = 1.f / wsum, k = 1.f / 255.f;
    float b = rintf(a0 * inv) * k, g = rintf(a1 * inv) * k, r = rintf(a2 * inv) * k;
    const float c0 = swap_rb ? r : b, c2 = swap_rb ? b : r;
    const size_t plane = (size_t)out_w * out_h, i = (size_t)oy * out_w + ox;
    out[i] = (c0 - m0) * k0;
    out[plane + i] = (g - m1) * k1;
    out[2 * plane + i] = (c2 - m2) * k2;
}
"""

_REDUCE_SRC = r"""
__global__ void reduce_logits(const float* __restrict__ logits, int C, int H, int W, int sub,
                              unsigned char* __restrict__ cls, unsigned int* __restrict__ counts,
                              unsigned int* __restrict__ sub_counts, float* __restrict__ conf_sums)
{
    extern __shared__ unsigned int sh[];
    unsigned int* s_counts = sh;
    unsigned int* s_sub = sh + C;
    float* s_conf = (float*)(sh + 2 * C);
    for (int c = threadIdx.x; c < C; c += blockDim.x) { s_counts[c] = 0u; s_sub[c] = 0u; s_conf[c] = 0.f; }
    __syncthreads();
    const int n = H * W;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) {
        const float* p = logits + idx;
        float best = p[0]; int arg = 0;
        for (int c = 1; c < C; ++c) { const float v = p[(size_t)c * n]; if (v > best) { best = v; arg = c; } }
        cls[idx] = (unsigned char)arg;
        atomicAdd(&s_counts[arg], 1u);
        const int y = idx / W, x = idx - y * W;
        if (y % sub == 0 && x % sub == 0) {
            float s = 0.f;
            for (int c = 0; c < C; ++c) s += expf(p[(size_t)c * n] - best);
            atomicAdd(&s_sub[arg], 1u);
            atomicAdd(&s_conf[arg], 1.f / s);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        if (s_counts[c]) atomicAdd(&counts[c], s_counts[c]);
        if (s_sub[c]) { atomicAdd(&sub_counts[c], s_sub[c]); atomicAdd(&conf_sums[c], s_conf[c]); }
    }
}
"""


# --------------------------------------------------------------------------- CPU references

@functools.lru_cache(maxsize=64)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of covered fractions, rows normalised to 1."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        f0, f1 = o * scale, (o + 1) * scale
        for i in range(max(0, math.floor(f0)), min(n_in, math.ceil(f1))):
            w[o, i] = max(0.0, min(f1, i + 1) - max(f0, i))
    w /= w.sum(1, keepdims=True)
    w.flags.writeable = False  # cached: shared by every call with these sizes
    return w


def area_resize_reference(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Exact area-averaging resize of an HxWxC image, float64 (the kernel's arithmetic)."""
    wy, wx = _area_weights(img.shape[0], height), _area_weights(img.shape[1], width)
    x = img.astype(np.float64)
    return np.einsum("oh,hwc,pw->opc", wy, x, wx, optimize=True)


def preprocess_reference(frame: np.ndarray, area: ContentArea, spec: InputSpec) -> np.ndarray:
    """What ``GpuPreprocessor.run`` computes, in numpy: float32 [1,3,H,W]."""
    crop = frame[area.y0:area.y1, area.x0:area.x1]
    x = np.rint(area_resize_reference(crop, spec.height, spec.width)) / 255.0
    if spec.color_order == "RGB":
        x = x[..., ::-1]
    x = (x - np.asarray(spec.mean)) / np.asarray(spec.std)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


def grey_level_differences(a: np.ndarray, b: np.ndarray, spec: InputSpec) -> np.ndarray:
    """|a - b| for two normalised [1,3,H,W] inputs, in grey levels of the uint8 image they came from."""
    std = np.asarray(spec.std, np.float64).reshape(1, 3, 1, 1)
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) * std * 255.0


SAME_INPUT_MAX_LEVELS = 1.001  # a mean within float rounding of x.5 may round the other way: one level
SAME_INPUT_MAX_FRACTION = 1e-3  # ... on at most this share of the values


def same_input(a: np.ndarray, b: np.ndarray, spec: InputSpec) -> tuple[bool, float, float]:
    """(equal as model inputs, max difference in grey levels, share of values off by more than 0.01 level)."""
    d = grey_level_differences(a, b, spec)
    worst, share = float(d.max()), float((d > 0.01).mean())
    return worst <= SAME_INPUT_MAX_LEVELS and share <= SAME_INPUT_MAX_FRACTION, worst, share


# The reduction's CPU definition is the anatomy stage's own (one arithmetic for both paths).
reduce_logits_reference = reduce_logits


# --------------------------------------------------------------------------- GPU classes

def _compile(src: str, name: str):
    from or_agent.pipelines.errors import DependencyError

    try:
        from pycuda.compiler import SourceModule
    except ImportError as exc:
        raise DependencyError(f"no CUDA GPU found (pycuda: {exc})") from None
    try:
        return SourceModule(src, options=["-O3"]).get_function(name)
    except Exception as exc:  # nvcc missing or failing
        raise DependencyError(f"cannot compile the {name} CUDA kernel (is nvcc on PATH?): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


class GpuResources:
    """A CUDA context (the device's primary one), a stream and the device memory allocated through
    them, released together by ``close()``."""

    def __init__(self, device: int = 0):
        self._ctx = CudaContext(device)
        self.cuda = self._ctx.cuda
        self._allocs: list = []
        self._closed = False
        with self._ctx:
            self.stream = self.cuda.Stream()

    def _alloc(self, nbytes: int):
        """Device memory owned by this object (the context must be current)."""
        a = self.cuda.mem_alloc(max(1, int(nbytes)))
        self._allocs.append(a)
        return a

    def alloc(self, nbytes: int):
        """Device memory owned by this object, from any thread."""
        with self._ctx:
            return self._alloc(nbytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._ctx:
            for a in self._allocs:
                a.free()
            self._allocs.clear()
            self.stream = None
        self._ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GpuPreprocessor(GpuResources):
    """uint8 BGR frame -> normalised float32 [1,3,H,W] for one model, on the GPU.

    ``max_frame_shape`` is (height, width) of the largest frame (e.g. (2160, 3840)); buffers are
    allocated once. Decode straight into ``pinned_frame(h, w)`` to skip the host-side copy into
    pinned memory (``cv2.VideoCapture.read(image=buf)`` writes into a given array).
    """

    def __init__(self, spec: InputSpec, max_frame_shape: tuple[int, int], device: int = 0):
        super().__init__(device)
        self.spec = spec
        self.max_h, self.max_w = int(max_frame_shape[0]), int(max_frame_shape[1])
        with self._ctx:
            self._kernel = _compile(_PREPROCESS_SRC, "preprocess_area")
            self._host = self.cuda.pagelocked_empty((self.max_h, self.max_w, 3), np.uint8)
            self._d_rows = self._alloc(self._host.nbytes)
            self.out_shape = (1, 3, spec.height, spec.width)
            self.d_out = self._alloc(int(np.prod(self.out_shape)) * 4)
            self._h_out = self.cuda.pagelocked_empty(self.out_shape, np.float32)
        self._copy2d = True

    def pinned_frame(self, height: int, width: int) -> np.ndarray:
        """A pinned HxWx3 uint8 buffer to decode into (a view of the preprocessor's own)."""
        self._check_shape(height, width)
        return self._host.reshape(-1)[: height * width * 3].reshape(height, width, 3)

    def _check_shape(self, h: int, w: int) -> None:
        if h > self.max_h or w > self.max_w:
            raise ValueError(f"frame {w}x{h} is larger than the preprocessor's maximum {self.max_w}x{self.max_h}")

    def enqueue(self, frame: np.ndarray, area: ContentArea):
        """Queue copy + kernel on ``self.stream``; returns the device output (valid after sync)."""
        self.enqueue_into(frame, area, [(self.spec, self.d_out)])
        return self.d_out

    def enqueue_into(self, frame: np.ndarray, area: ContentArea, targets) -> None:
        """Upload the frame's content crop once and queue one kernel per ``(InputSpec, device
        buffer)`` target (each buffer float32 [1,3,H,W] of its spec), all on ``self.stream``."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HxWx3 BGR frame, got {frame.dtype} {frame.shape}")
        h, w = frame.shape[:2]
        self._check_shape(h, w)
        pinned = self.pinned_frame(h, w)
        staged = frame.__array_interface__["data"][0] == pinned.__array_interface__["data"][0] and frame.flags.c_contiguous
        cw, ch = area.crop_size
        x0, pitch = self._copy_crop(None if staged else frame, pinned, area, w)
        for spec, d_out in targets:
            norm = [np.float32(v) for v in (*spec.mean, *(1.0 / s for s in spec.std))]
            sx, sy = np.float32(cw / spec.width), np.float32(ch / spec.height)
            block = (32, 8, 1)
            grid = ((spec.width + 31) // 32, (spec.height + 7) // 8, 1)
            self._kernel(self._d_rows, np.int32(pitch), np.int32(x0), np.int32(cw), np.int32(ch), sx, sy,
                         d_out, np.int32(spec.width), np.int32(spec.height),
                         np.int32(spec.color_order == "RGB"), *norm,
                         block=block, grid=grid, stream=self.stream)

    def _copy_crop(self, frame: np.ndarray | None, pinned: np.ndarray, area: ContentArea, w: int) -> tuple[int, int]:
        """Only the crop rectangle goes to the device (a 2-D copy, packed); where the 2-D copy is
        refused, the crop's full rows (contiguous). ``frame`` (None when it was decoded into ``pinned``)
        is staged into pinned memory first, as much of it as that copy reads.
        Returns (x0 on the device, device pitch)."""
        cw, ch = area.crop_size
        rows = slice(area.y0, area.y1)
        if self._copy2d:
            if frame is not None:
                np.copyto(pinned[rows, area.x0:area.x1], frame[rows, area.x0:area.x1])
            try:
                m = self.cuda.Memcpy2D()
                m.set_src_host(pinned)
                m.src_x_in_bytes, m.src_y, m.src_pitch = area.x0 * 3, area.y0, w * 3
                m.set_dst_device(self._d_rows)
                m.dst_pitch = m.width_in_bytes = cw * 3
                m.height = ch
                m(self.stream)
                return 0, cw * 3
            except Exception:
                self._copy2d = False
        if frame is not None:
            np.copyto(pinned[rows], frame[rows])
        self.cuda.memcpy_htod_async(self._d_rows, pinned[rows], self.stream)
        return area.x0, w * 3

    def run(self, frame: np.ndarray, area: ContentArea) -> np.ndarray:
        """The model input on the host (a copy): for parity checks and host backends."""
        with self._ctx:
            d = self.enqueue(frame, area)
            self.cuda.memcpy_dtoh_async(self._h_out, d, self.stream)
            self.stream.synchronize()
            return self._h_out.copy()


class GpuLogitsReducer(GpuResources):
    """Segmentation logits [C,H,W] on the device -> class map, per-class counts and confidence."""

    def __init__(self, classes: int, height: int, width: int, device: int = 0, sub: int = CONF_SUBSAMPLE):
        super().__init__(device)
        if not 1 <= classes <= 255:
            raise ValueError(f"classes must be 1..255, got {classes}")
        self.classes, self.height, self.width, self.sub = int(classes), int(height), int(width), int(sub)
        n = self.height * self.width
        with self._ctx:
            self._kernel = _compile(_REDUCE_SRC, "reduce_logits")
            self.d_map = self._alloc(n)
            self._d_stats = self._alloc(3 * self.classes * 4)  # counts u32 | sub counts u32 | conf sums f32
            self._h_map = self.cuda.pagelocked_empty((self.height, self.width), np.uint8)
            self._h_stats = self.cuda.pagelocked_empty(3 * self.classes, np.uint32)
        # Upload buffers for host logits (``reduce``), made on first use: the frame path reduces
        # engine outputs already on the device and never needs them.
        self.d_logits = None
        self._h_logits: np.ndarray | None = None

    def reduce_device(self, d_logits, want_map: bool = True):
        """Reduce logits already on the device (e.g. a TensorRT output buffer) on ``self.stream``."""
        cuda, c, n = self.cuda, self.classes, self.height * self.width
        with self._ctx:
            cuda.memset_d32_async(self._d_stats, 0, 3 * c, self.stream)
            threads = 256
            stats = int(self._d_stats)
            self._kernel(np.uintp(int(d_logits)), np.int32(c), np.int32(self.height), np.int32(self.width), np.int32(self.sub),
                         self.d_map, np.uintp(stats), np.uintp(stats + 4 * c), np.uintp(stats + 8 * c),
                         block=(threads, 1, 1), grid=((n + threads - 1) // threads, 1, 1),
                         shared=3 * c * 4, stream=self.stream)
            cuda.memcpy_dtoh_async(self._h_stats, self._d_stats, self.stream)
            if want_map:
                cuda.memcpy_dtoh_async(self._h_map, self.d_map, self.stream)
            self.stream.synchronize()
        counts = self._h_stats[:c].astype(np.int64)
        sub_counts = self._h_stats[c:2 * c].astype(np.int64)
        sums = self._h_stats[2 * c:].view(np.float32).astype(np.float64)
        return (self._h_map.copy() if want_map else None), counts, class_confidence(counts, sub_counts, sums)

    def reduce(self, logits: np.ndarray, want_map: bool = True):
        """Host logits ([1,C,H,W] or [C,H,W]) uploaded, then reduced: for tests and host backends."""
        lg = np.asarray(logits, np.float32)
        lg = lg[0] if lg.ndim == 4 else lg
        shape = (self.classes, self.height, self.width)
        if lg.shape != shape:
            raise ValueError(f"logits shape {lg.shape}, reducer was made for {shape}")
        with self._ctx:
            if self.d_logits is None:
                self.d_logits = self._alloc(lg.nbytes)
                self._h_logits = self.cuda.pagelocked_empty(shape, np.float32)
            assert self._h_logits is not None  # made with the device buffer above
            np.copyto(self._h_logits, lg)
            self.cuda.memcpy_htod_async(self.d_logits, self._h_logits, self.stream)
        return self.reduce_device(self.d_logits, want_map)
