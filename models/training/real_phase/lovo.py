"""Leave-one-video-out phase recognition on the 4 cholect50-val operations, from cached features.

    python -m or_agent.models.training.real_phase.features --views 6   # once (~8 min)
    python -m or_agent.models.training.real_phase.lovo                 # ~1 min: prints the table, writes figures

Per fold: train on the 3 other operations' key frames (all views), the 4 real clips, the video01
frames and the Endoscapes frames (as Calot triangle dissection, the phase they were all taken in),
test on the held-out operation in time order: raw frame accuracy, and after the causal HMM filter
(``hmm.PhaseHMM``, transitions counted from the Cholec80 labels of the 76 videos other than the four
evaluated, stepped by the real gap between key frames).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from or_agent.models.training.real_phase.data import CACHE, PHASES, VAL_VIDEOS, cholec80_phase_per_second, load_all
from or_agent.models.training.real_phase.hmm import PhaseHMM, transition_matrix
from or_agent.pipelines.metrics import mean_over_videos, official_phase_scores, phase_scores

CALOT = PHASES.index("CalotTriangleDissection")


@dataclass
class Config:
    taps: tuple = ("head",)
    train_views: int = 6
    test_views: tuple = (0, 1)
    endo_weight: float = 1.0
    clips_weight: float = 1.0
    video01_weight: float = 1.0
    C: float = 0.05
    balanced: bool = True
    l2norm: bool = False
    center: str = "none"  # none | causal (running mean of the video's features so far)
    center_momentum: float = 0.0  # 0 = cumulative mean; else EMA weight of the new frame
    hmm_prior: bool = True  # divide probs by the training class prior
    hmm_power: float = 1.0
    seed: int = 0
    extra: dict = field(default_factory=dict)


def load_feats(size=(224, 224)):
    z = np.load(CACHE / f"feats-{size[0]}x{size[1]}.npz")
    return {k: z[k] for k in z.files}


def feature(feats, source: str, taps, views) -> np.ndarray:
    """[len(views), N, D] concatenated taps."""
    return np.concatenate([feats[f"{source}/{t}"][list(views)] for t in taps], axis=-1)


def causal_center(x: np.ndarray, groups: np.ndarray, order_key: np.ndarray, momentum: float = 0.0) -> np.ndarray:
    """Subtract, per video in time order, the mean of that video's features seen so far
    (including the current frame): what a streaming agent can do."""
    out = np.empty_like(x)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        idx = idx[np.argsort(order_key[idx], kind="stable")]
        mean = np.zeros(x.shape[-1])
        for n, i in enumerate(idx):
            m = (1.0 / (n + 1)) if momentum == 0 else max(momentum, 1.0 / (n + 1))
            cur = x[..., i, :].mean(0) if x.ndim == 3 else x[i]
            mean = (1 - m) * mean + m * cur
            out[..., i, :] = x[..., i, :] - mean
    return out


def build_training(feats, sets, cfg: Config, held_out: str | None):
    xs, ys, ws = [], [], []
    views = range(cfg.train_views)

    def add(source, mask, labels, weight):
        if weight <= 0 or not mask.any():
            return
        x = feature(feats, source, cfg.taps, views)
        if cfg.center == "causal":
            fs = sets[source]
            x = causal_center(x, fs.group, fs.second, cfg.center_momentum)
        x = x[:, mask]
        xs.append(x.reshape(-1, x.shape[-1]))
        ys.append(np.tile(labels[mask], len(views)))
        # each source's weight is per frame, shared by its views
        ws.append(np.full(x.shape[0] * x.shape[1], weight / len(views)))

    val = sets["val"]
    add("val", val.group != held_out, val.phase, 1.0)
    add("clips", np.ones(len(sets["clips"].phase), bool), sets["clips"].phase, cfg.clips_weight)
    add("video01", np.ones(len(sets["video01"].phase), bool), sets["video01"].phase, cfg.video01_weight)
    endo = sets["endoscapes"]
    add("endoscapes", np.ones(len(endo.phase), bool), np.full(len(endo.phase), CALOT), cfg.endo_weight)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def fit_logistic(x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, C: float, classes: int):
    """Multinomial logistic regression, L2-penalised as scikit-learn's (0.5 |W|^2 + C * weighted
    cross-entropy summed over samples), solved by L-BFGS in torch: (coef [K, D], intercept [K])."""
    import torch

    X = torch.from_numpy(np.ascontiguousarray(x, np.float64))
    Y = torch.from_numpy(np.asarray(y, np.int64))
    SW = torch.from_numpy(np.asarray(sample_weight, np.float64))
    W = torch.zeros(classes, X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    scale = 1.0 / len(X)  # the objective divided by N, for a well-scaled solve

    def closure():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(X @ W.T + b, Y, reduction="none")
        loss = scale * (C * (SW * ce).sum() + 0.5 * (W * W).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


class LinearPhase:
    """Standardise -> (optional L2 norm first) -> multinomial logistic regression."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _pre(self, x):
        if self.cfg.l2norm:
            x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return x

    def fit(self, x, y, w):
        x = self._pre(x)
        self.mu = np.average(x, axis=0, weights=w)
        self.sd = np.sqrt(np.average((x - self.mu) ** 2, axis=0, weights=w)) + 1e-6
        cw = np.ones(len(PHASES))
        if self.cfg.balanced:
            tot = np.array([w[y == k].sum() for k in range(len(PHASES))])
            cw = tot.sum() / np.maximum(tot, 1e-9) / len(PHASES)
            cw = np.where(tot > 0, cw, 0)
        sw = w * cw[y]
        sw = sw / sw.mean()
        self.coef_, self.intercept_ = fit_logistic((x - self.mu) / self.sd, y, sw, self.cfg.C, len(PHASES))
        prior = np.array([sw[y == k].sum() for k in range(len(PHASES))])
        self.prior = prior / prior.sum()
        return self

    def logits(self, x):
        x = self._pre(x)
        return ((x - self.mu) / self.sd) @ self.coef_.T + self.intercept_

    def proba(self, x):
        z = self.logits(x)
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    def as_affine(self):
        """(W [D,7], b [7]) with logits = x @ W + b on the raw (un-standardised) feature."""
        assert not self.cfg.l2norm
        W = (self.coef_ / self.sd).T
        b = self.intercept_ - self.mu / self.sd @ self.coef_.T
        return W.astype(np.float32), b.astype(np.float32)


def filter_sequence(hmm: PhaseHMM, probs: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    hmm.reset()
    out, prev = [], None
    for p, s in zip(probs, seconds):
        out.append(hmm.update(p, 0.0 if prev is None else s - prev))
        prev = s
    return np.array(out)


def run(cfg: Config, feats=None, sets=None, verbose: bool = False) -> dict:
    feats = feats if feats is not None else load_feats()
    sets = sets if sets is not None else load_all(224, 224, ("val", "clips", "video01", "endoscapes"))
    series = cholec80_phase_per_second()
    a = transition_matrix(series, exclude={"video68", "video70", "video73", "video75"})
    val = sets["val"]
    rows = []
    for v in VAL_VIDEOS:
        x, y, w = build_training(feats, sets, cfg, v)
        model = LinearPhase(cfg).fit(x, y, w)
        xt = feature(feats, "val", cfg.taps, cfg.test_views)
        if cfg.center == "causal":
            xt = causal_center(xt, val.group, val.second, cfg.center_momentum)
        m = val.group == v
        order = np.argsort(val.second[m], kind="stable")
        probs = np.mean([model.proba(xt[i][m]) for i in range(len(cfg.test_views))], axis=0)[order]
        yt, sec = val.phase[m][order], val.second[m][order]
        hmm = PhaseHMM(a, class_prior=model.prior if cfg.hmm_prior else None, power=cfg.hmm_power)
        post = filter_sequence(hmm, probs, sec)
        maj = np.bincount(yt, minlength=7).max() / len(yt)
        names = tuple(PHASES)
        rows.append({"video": v, "raw": phase_scores(yt, probs.argmax(1), names),
                     "filtered": phase_scores(yt, post.argmax(1), names),
                     "official_filtered": official_phase_scores(yt, post.argmax(1), sec, names),
                     "majority": float(maj)})
    res = {
        "config": asdict(cfg),
        "videos": {r["video"]: {"raw": r["raw"]["accuracy"], "filtered": r["filtered"]["accuracy"], "majority": r["majority"]}
                   for r in rows},
        "mean_raw": float(np.mean([r["raw"]["accuracy"] for r in rows])),
        "mean_filtered": float(np.mean([r["filtered"]["accuracy"] for r in rows])),
        "mean_majority": float(np.mean([r["majority"] for r in rows])),
        "per_phase_raw": mean_over_videos([r["raw"] for r in rows])["per_phase"],
        "per_phase_filtered": mean_over_videos([r["filtered"] for r in rows])["per_phase"],
        "official_filtered": mean_over_videos([r["official_filtered"] for r in rows]),
        "detail": rows,
    }
    if verbose:
        print_table(res)
    return res


def print_table(res: dict) -> None:
    print(f"{'video':8s} {'raw':>6s} {'filt':>6s} {'major':>6s}")
    for v, r in res["videos"].items():
        print(f"{v:8s} {r['raw']:6.3f} {r['filtered']:6.3f} {r['majority']:6.3f}")
    print(f"{'mean':8s} {res['mean_raw']:6.3f} {res['mean_filtered']:6.3f} {res['mean_majority']:6.3f}")
    o = res["official_filtered"]
    print(f"official (Evaluate.m, filtered): accuracy {o['accuracy']:.3f}, precision {o['precision']:.3f}, "
          f"recall {o['recall']:.3f}, Jaccard {o['jaccard']:.3f}")
    print(f"{'phase':26s} {'P raw':>6s} {'R raw':>6s} {'J raw':>6s} | {'P filt':>6s} {'R filt':>6s} {'J filt':>6s}")
    f = lambda x: " " * 6 if x is None else f"{x:6.3f}"  # noqa: E731
    for ph in PHASES:
        none = {"precision": None, "recall": None, "jaccard": None}
        a, b = res["per_phase_raw"].get(ph, none), res["per_phase_filtered"].get(ph, none)
        print(f"{ph:26s} {f(a['precision'])} {f(a['recall'])} {f(a['jaccard'])} | {f(b['precision'])} {f(b['recall'])} {f(b['jaccard'])}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(CACHE / "lovo.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    res = run(Config(), verbose=True)
    res["wall_s"] = round(time.time() - t0, 1)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"({res['wall_s']} s) -> {args.out}")


if __name__ == "__main__":
    main()
