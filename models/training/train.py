"""Train, export and measure the reference models; write their manifests.

    python -m or_agent.models.training.train all        # data + three models + held-out metrics (~25 min, 2 cores)
    python -m or_agent.models.training.train anatomy    # one model

Needs the ``train`` extra (torch 2.13 CPU). Everything is seeded; figures reproduce within the
tolerance stated in models/README.md (CPU thread scheduling makes training not bit-exact).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

from or_agent.models.training.samples import ANATOMY_SIZE, PHASE_RATE_HZ, PHASE_SIZE, VISIBILITY_SIZE, decode_video
from or_agent.pipelines.manifest import SCHEMA, sha256_of
from or_agent.pipelines.surgery import ANATOMY_CLASSES, PHASES
from or_agent.synth.splits import HELD_OUT, TRAIN, ensure_dataset, video_names

MODELS_DIR = Path(__file__).resolve().parent.parent / "synthetic"  # the reference model set
MEAN = (0.485, 0.456, 0.406)  # RGB, ImageNet statistics: a hospital's own backbones usually expect them
STD = (0.229, 0.224, 0.225)
PHASE_COLOURS = [(52, 101, 164), (78, 154, 6), (196, 160, 0), (204, 0, 0), (117, 80, 123), (206, 92, 0), (0, 150, 150)]


def _torch():
    try:
        import torch
    except ImportError:
        sys.exit("training needs torch: pip install -e '.[train]'  (torch==2.13.0, CPU build)")
    torch.set_num_threads(2)
    return torch


def to_tensor(torch, batch_bgr: np.ndarray):
    """uint8 N,H,W,3 BGR -> normalised float N,3,H,W RGB, as pipelines.preprocess.normalise does."""
    x = torch.from_numpy(np.ascontiguousarray(batch_bgr[..., ::-1])).float().div_(255.0)
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(0, 3, 1, 2).contiguous()


def jitter(rng: np.random.Generator, batch: np.ndarray) -> np.ndarray:
    """Brightness/contrast/colour jitter, per image, on uint8 BGR."""
    gain = rng.uniform(0.75, 1.25, (len(batch), 1, 1, 3)).astype(np.float32)
    bias = rng.uniform(-20, 20, (len(batch), 1, 1, 1)).astype(np.float32)
    return np.clip(batch.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)


def load(cfg):
    d = ensure_dataset(MODELS_DIR.parent.parent / "data", cfg)
    return [decode_video(d, n) for n in video_names(d)]


def export(torch, net, args, names_in, names_out, path: Path) -> None:
    net.eval()
    torch.onnx.export(net, args, str(path), input_names=names_in, output_names=names_out,
                      opset_version=17, do_constant_folding=True, dynamo=False)


def fit(torch, params, steps: int, lr: float, batch_loss, label: str, report_every: int = 50) -> None:
    """AdamW with a one-cycle schedule; ``batch_loss(step)`` draws a batch and returns its loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.time()
    for step in range(steps):
        loss = batch_loss(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % report_every == 0 or step == steps - 1:
            print(f"  {label} step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)


def train_anatomy(torch, videos, steps: int, seed: int = 0):
    from torch.nn import functional as F

    from or_agent.models.training.nets import AnatomyNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = np.concatenate([v.anatomy_x for v in videos])
    Y = np.concatenate([v.anatomy_y for v in videos])
    counts = np.bincount(Y.ravel(), minlength=len(ANATOMY_CLASSES)).astype(np.float64)
    weight = torch.tensor(np.clip((counts.sum() / np.maximum(counts, 1) / len(counts)) ** 0.5, 0.3, 10.0), dtype=torch.float32)
    net = AnatomyNet()
    ch, cw = ANATOMY_SIZE[0] // 2, ANATOMY_SIZE[1] // 2
    net.train()

    def batch_loss(_step):
        idx = rng.integers(0, len(X), 16)
        y0, x0 = int(rng.integers(0, ANATOMY_SIZE[0] - ch + 1)), int(rng.integers(0, ANATOMY_SIZE[1] - cw + 1))
        xb = jitter(rng, X[idx, y0:y0 + ch, x0:x0 + cw])
        yb = Y[idx, y0:y0 + ch, x0:x0 + cw]
        if rng.random() < 0.5:
            xb, yb = xb[:, :, ::-1], yb[:, :, ::-1]
        return F.cross_entropy(net(to_tensor(torch, xb)), torch.from_numpy(np.ascontiguousarray(yb)).long(), weight=weight)

    fit(torch, net.parameters(), steps, 4e-3, batch_loss, "anatomy")
    return net


def train_phase(torch, videos, enc_steps: int, gru_epochs: int, seed: int = 0):
    from torch.nn import functional as F

    from or_agent.models.training.nets import PHASE_STATE, PhaseNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PhaseNet()
    X = np.concatenate([v.phase_x for v in videos])
    Y = np.concatenate([v.phase_y for v in videos])
    enc_params = list(net.encoder.parameters()) + list(net.frame_head.parameters())
    net.train()

    def batch_loss(_step):
        idx = rng.integers(0, len(X), 48)
        xb = jitter(rng, X[idx])
        if rng.random() < 0.5:
            xb = xb[:, :, ::-1]
        return F.cross_entropy(net.frame_head(net.encoder(to_tensor(torch, xb))), torch.from_numpy(Y[idx]))

    fit(torch, enc_params, enc_steps, 3e-3, batch_loss, "phase encoder")
    t0 = time.time()
    # The recurrent part learns on frozen per-step features of whole surgeries, from a zero state,
    # exactly as the agent streams them.
    net.eval()
    with torch.no_grad():
        feats = [net.encoder(to_tensor(torch, v.phase_x)) for v in videos]
    # nn.GRU runs the same cell as PhaseNet.step (gate order r, z, n; r applied to the hidden
    # candidate) but fused, so whole surgeries train in seconds; its weights are copied over.
    gru = torch.nn.GRU(net.encoder.features, PHASE_STATE, batch_first=True)
    head = net.head
    rec_params = list(gru.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(rec_params, lr=3e-3)
    for epoch in range(gru_epochs):
        total = 0.0
        for k in rng.permutation(len(videos)):
            f = (feats[k] + 0.1 * torch.randn_like(feats[k]) * feats[k].std())[None]
            y = torch.from_numpy(videos[k].phase_y)
            states, _ = gru(f)
            loss = F.cross_entropy(head(torch.cat([states[0], f[0]], 1)), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rec_params, 1.0)
            opt.step()
            total += loss.item()
        if epoch % 20 == 0 or epoch == gru_epochs - 1:
            print(f"  phase recurrent epoch {epoch + 1}/{gru_epochs} loss {total / len(videos):.3f} ({time.time() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        net.gates_x.weight.copy_(gru.weight_ih_l0)
        net.gates_x.bias.copy_(gru.bias_ih_l0)
        net.gates_h.weight.copy_(gru.weight_hh_l0)
        net.gates_h.bias.copy_(gru.bias_hh_l0)
    return net


def train_visibility(torch, videos, steps: int, seed: int = 0):
    from torch.nn import functional as F

    from or_agent.models.training.nets import VisibilityNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = np.concatenate([v.vis_x for v in videos])
    Y = np.concatenate([v.vis_y for v in videos])
    pos = Y.mean(0)
    pos_weight = torch.tensor(np.clip((1 - pos) / np.maximum(pos, 1e-3), 1, 20), dtype=torch.float32)
    net = VisibilityNet()
    net.train()

    def batch_loss(_step):
        idx = rng.integers(0, len(X), 64)
        xb = jitter(rng, X[idx])
        return F.binary_cross_entropy_with_logits(net(to_tensor(torch, xb)), torch.from_numpy(Y[idx]), pos_weight=pos_weight)

    fit(torch, net.parameters(), steps, 3e-3, batch_loss, "visibility", report_every=100)
    return net


def manifest_for(task: str, name: str, size: tuple[int, int], outputs: list[dict], labels: list[dict],
                 state_inputs: list[dict] | None = None, extra: dict | None = None, cadence: str = "every frame") -> dict:
    return {
        "schema": SCHEMA,
        "name": name,
        "version": "1.0.0",
        "task": task,
        "file": "model.onnx",
        "sha256": "",
        "license": "Apache-2.0",
        "datasets": [{"name": f"or-agent synthetic laparoscopic cholecystectomies (or-agent synth, {TRAIN.videos} videos, "
                              f"seed {TRAIN.seed}, time scale 1/{TRAIN.time_scale:g})",
                      "license": "Apache-2.0",
                      "attribution": "procedurally rendered by or-agent's own generator (synth/); no patient data"}],
        "cadence": cadence,
        "input": {"name": "frame", "shape": [1, 3, size[0], size[1]], "layout": "NCHW", "color_order": "RGB",
                  "value_range": [0, 1], "mean": list(MEAN), "std": list(STD),
                  "crop": "endoscope content area (bounding box of the circular field of view)"},
        "state_inputs": state_inputs or [],
        "outputs": outputs,
        "labels": labels,
        "training": {
            "data": (f"synthetic laparoscopic cholecystectomy (or-agent synth), {TRAIN.videos} videos, seed {TRAIN.seed}, "
                     f"time scale 1/{TRAIN.time_scale:g}, 854x480 at 25 fps; masks every {TRAIN.mask_every} frames"),
            "command": "python -m or_agent.models.training.train all",
            "trained_on": datetime.date.today().isoformat(),
            "not_for_clinical_use": "trained on synthetic data only: shows the pipeline working",
        },
        "metrics": {},
        **(extra or {}),
    }


MODEL_SPECS = {
    "anatomy": lambda: manifest_for(
        "segmentation", "anatomy", ANATOMY_SIZE,
        outputs=[{"name": "logits", "shape": [1, len(ANATOMY_CLASSES), *ANATOMY_SIZE],
                  "meaning": "per-class logits at input resolution (argmax = class map)"}],
        labels=[{"id": i, "name": n, "color": list(c)} for i, n, c in ANATOMY_CLASSES]),
    "phase": lambda: manifest_for(
        "phase", "phase", PHASE_SIZE,
        state_inputs=[{"name": "state_in", "shape": [1, 64],
                       "meaning": "recurrent state from the previous step; zeros at the start of a case"}],
        outputs=[{"name": "phase_logits", "shape": [1, len(PHASES)],
                  "meaning": "logits over the 7 Cholec80 phases (softmax = probabilities)"},
                 {"name": "state_out", "shape": [1, 64], "meaning": "recurrent state for the next step", "state_of": "state_in"}],
        labels=[{"id": i, "name": n, "color": list(PHASE_COLOURS[i])} for i, n in enumerate(PHASES)],
        # the HMM filter's transitions from the real Cholec80 statistics, on the synthetic videos' compressed time
        cadence=f"{PHASE_RATE_HZ:g} Hz", extra={"temporal_filter": {"time_scale": TRAIN.time_scale}}),
    "visibility": lambda: manifest_for(
        "visibility", "visibility", VISIBILITY_SIZE,
        outputs=[{"name": "visibility_logits", "shape": [1, 2],
                  "meaning": "independent logits: [out_of_body, low_visibility (smoke or blur)]; sigmoid > 0.5 = yes"}],
        labels=[{"id": 0, "name": "out_of_body", "color": [90, 90, 90]}, {"id": 1, "name": "low_visibility", "color": [200, 200, 200]}]),
}


def write_model(torch, which: str, net) -> Path:
    out_dir = MODELS_DIR / which
    out_dir.mkdir(exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    spec = MODEL_SPECS[which]()
    size = spec["input"]["shape"]
    frame = torch.zeros(*size)
    if which == "phase":
        export(torch, net, (frame, torch.zeros(1, 64)), ["frame", "state_in"], ["phase_logits", "state_out"], onnx_path)
    elif which == "anatomy":
        export(torch, net, (frame,), ["frame"], ["logits"], onnx_path)
    else:
        export(torch, net, (frame,), ["frame"], ["visibility_logits"], onnx_path)
    spec["sha256"] = sha256_of(onnx_path)
    old = out_dir / "manifest.json"
    if old.exists():  # keep earlier held-out metrics until they are measured again
        spec["metrics"] = json.loads(old.read_text()).get("metrics", {})
    (out_dir / "manifest.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"  wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB)")
    return out_dir


def measure_held_out() -> dict:
    from or_agent.models.evaluate import evaluate_dataset

    d = ensure_dataset(MODELS_DIR.parent.parent / "data", HELD_OUT)
    summary = evaluate_dataset(d, models_dir=MODELS_DIR).summary()
    held = f"{HELD_OUT.videos} held-out synthetic videos (seed {HELD_OUT.seed}, time scale 1/{HELD_OUT.time_scale:g})"
    picks = {
        "anatomy": ["anatomy_miou", "anatomy_iou_per_class"],
        "phase": ["phase_accuracy", "phase_accuracy_raw"],
        "visibility": ["out_of_body_recall", "out_of_body_false_positive_rate", "low_visibility_recall", "low_visibility_accuracy"],
    }
    task_of = {"anatomy": "segmentation", "phase": "phase", "visibility": "visibility"}
    for which, keys in picks.items():
        path = MODELS_DIR / which / "manifest.json"
        doc = json.loads(path.read_text())
        doc["metrics"] = {"held_out": held, **{k: summary[k] for k in keys},
                          "ms_per_frame_onnxruntime_cpu_1_thread": summary["ms_per_frame_ort_1_thread"][task_of[which]]}
        path.write_text(json.dumps(doc, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["all", "anatomy", "phase", "visibility", "measure"])
    ap.add_argument("--anatomy-steps", type=int, default=3000)
    ap.add_argument("--phase-steps", type=int, default=600)
    ap.add_argument("--phase-epochs", type=int, default=150)
    ap.add_argument("--visibility-steps", type=int, default=500)
    args = ap.parse_args(argv)
    t0 = time.time()
    torch = _torch()
    print("data: generating or reusing the synthetic training set", flush=True)
    videos = load(TRAIN)
    if args.which in ("all", "anatomy"):
        write_model(torch, "anatomy", train_anatomy(torch, videos, args.anatomy_steps))
    if args.which in ("all", "phase"):
        write_model(torch, "phase", train_phase(torch, videos, args.phase_steps, args.phase_epochs))
    if args.which in ("all", "visibility"):
        write_model(torch, "visibility", train_visibility(torch, videos, args.visibility_steps))
    print("measuring on held-out videos", flush=True)
    summary = measure_held_out()
    print(json.dumps(summary, indent=1))
    print(f"done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
