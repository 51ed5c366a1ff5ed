"""The "unfamiliar scene" pause: a phase model's familiarity output, its hysteresis, and everything that
stops showing the models' output while it holds (the wire, the picture, the alerts, replay).

The phase model here is a real ONNX graph whose familiarity output is the frame's mean brightness (its
manifest's normalisation is the identity), so a video of uniform frames of chosen brightness drives the
check through known distances."""

import csv
import hashlib
import json

import cv2
import numpy as np
import pytest

from or_agent.agent.wire import overlay_to_pb
from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import ManifestError, ModelError
from or_agent.pipelines.familiarity import FamiliarityCheck, SceneFamiliarity
from or_agent.pipelines.manifest import load_manifest
from or_agent.pipelines.messages import (
    ClassificationEstimate,
    FrameResult,
    PhaseEstimate,
    SegmentationEstimate,
    VisibilityEstimate,
)
from or_agent.pipelines.overlay import OverlayRenderer
from or_agent.pipelines.preprocess import ContentArea
from or_agent.pipelines.rules import RuleInputs, RulesEngine, load_rules
from or_agent.pipelines.stages import PhaseOutputs, PhaseStage
from or_agent.pipelines.surgery import ANATOMY_NAMES, PHASE_ID, PHASES
from tests.conftest import ROOT

SYNTHETIC = ROOT / "models" / "synthetic"
CALOT = PHASE_ID["CalotTriangleDissection"]
FAMILIARITY = {"output": "feature_distance", "pause_above": 0.6, "resume_below": 0.4, "pause_after_steps": 2,
               "resume_after_steps": 3, "calibration": {"method": "chosen for the test"}}


def _brightness_phase_onnx(path, size=32, bright_phase=None, gain=0.0):
    """Phase logits on Calot triangle dissection (plus ``gain`` x the mean for ``bright_phase``: bright frames
    say that phase); ``feature_distance`` = the mean of the input."""
    import onnx
    from onnx import TensorProto, helper

    bias = [0.0] * 7
    bias[CALOT] = 3.0
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["frame"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w_phase", "b_phase"], ["phase_logits"]),
         helper.make_node("Gemm", ["flat", "w_mean", "b_mean"], ["feature_distance"])],
        "phase_with_familiarity",
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("phase_logits", TensorProto.FLOAT, [1, 7]),
         helper.make_tensor_value_info("feature_distance", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor("w_phase", TensorProto.FLOAT, [3, 7],
                            [gain / 3 if bright_phase is not None and k % 7 == bright_phase else 0.0 for k in range(21)]),
         helper.make_tensor("b_phase", TensorProto.FLOAT, [7], bias),
         helper.make_tensor("w_mean", TensorProto.FLOAT, [3, 1], [1 / 3] * 3),
         helper.make_tensor("b_mean", TensorProto.FLOAT, [1], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _phase_model(folder, familiarity=FAMILIARITY, cadence="every frame", **bright):
    folder.mkdir(parents=True)
    _brightness_phase_onnx(folder / "model.onnx", **bright)
    doc = json.loads((SYNTHETIC / "phase" / "manifest.json").read_text())
    for key in ("training", "metrics", "calibration", "temporal_filter"):
        doc.pop(key, None)
    doc.update(sha256=hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest(), cadence=cadence, state_inputs=[],
               outputs=[{"name": "phase_logits", "shape": [1, 7], "meaning": "logits over the 7 Cholec80 phases"},
                        {"name": "feature_distance", "shape": [1, 1], "meaning": "mean brightness, as a distance"}])
    doc["input"].update(shape=[1, 3, 32, 32], mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    if familiarity is not None:
        doc["familiarity"] = familiarity
    (folder / "manifest.json").write_text(json.dumps(doc, indent=1))
    return folder


def _stage(tmp_path, **kw):
    return PhaseStage(OnnxRuntimeBackend(load_manifest(_phase_model(tmp_path / "phase", **kw))))


def _uniform(value, w=64, h=48):
    return np.full((h, w, 3), value, np.uint8)


def test_the_scene_pauses_and_resumes_with_hysteresis():
    f = SceneFamiliarity(FamiliarityCheck("d", pause_above=0.6, resume_below=0.4, pause_after_steps=2, resume_after_steps=3))
    distances = [0.1, 0.9, 0.2, 0.9, 0.9, 0.9, 0.5, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.9]
    familiar = [f.update(d) for d in distances]
    # one far step is not enough; two are. Between the thresholds nothing changes; three near steps in a row resume.
    assert familiar == [True, True, True, True, False, False, False, False, False, False, False, False, True, True]
    f.reset()
    assert f.familiar
    assert f.update(float("nan")) and not f.update(float("nan"))  # not a number counts as far


@pytest.mark.parametrize("change, message", [
    ({"resume_below": 0.7}, "familiarity.resume_below: must not be above pause_above (0.6), got 0.7"),
    ({"pause_after_steps": 0}, "familiarity.pause_after_steps: must be a whole number of steps, at least 1, got 0"),
    ({"resume_after_steps": 1.5}, "familiarity.resume_after_steps: must be a whole number of steps, at least 1, got 1.5"),
    ({"pause_above": "high"}, "familiarity.pause_above: must be a number, got 'high'"),
    ({"output": "distance"}, "familiarity.output: the model has no output 'distance' (outputs: phase_logits, feature_distance)"),
    ({"output": "phase_logits"}, "familiarity.output: 'phase_logits' has shape [1, 7]: a distance is one number"),
])
def test_bad_familiarity_blocks_are_refused_with_one_line(tmp_path, change, message):
    with pytest.raises(ManifestError) as err:
        _stage(tmp_path, familiarity={**FAMILIARITY, **change})
    assert str(err.value) == f"{tmp_path / 'phase' / 'manifest.json'}: {message}"


def test_a_missing_threshold_is_named(tmp_path):
    block = dict(FAMILIARITY)
    del block["resume_below"]
    with pytest.raises(ManifestError) as err:
        _stage(tmp_path, familiarity=block)
    assert str(err.value) == f"{tmp_path / 'phase' / 'manifest.json'}: familiarity.resume_below: missing"


def test_two_outputs_without_a_familiarity_block_is_refused_at_load(tmp_path):
    with pytest.raises(ModelError) as err:
        _stage(tmp_path, familiarity=None)
    assert str(err.value) == (f"{tmp_path / 'phase' / 'manifest.json'}: expected exactly one phase output besides the "
                              "state, found ['phase_logits', 'feature_distance']")


def test_the_phase_stage_reads_the_distance_and_keeps_filtering_while_unfamiliar(tmp_path):
    stage = _stage(tmp_path)
    assert stage.output_name == "phase_logits"
    area = ContentArea.whole_frame(64, 48)
    values = [40, 220, 220, 220, 128, 40, 40, 40, 40]
    estimates = [stage(_uniform(v), area, 0.2 * k) for k, v in enumerate(values)]
    assert [e.feature_distance for e in estimates] == pytest.approx([v / 255 for v in values], abs=1e-5)
    assert [e.familiar for e in estimates] == [True, True, False, False, False, False, False, True, True]
    # the filter stepped on throughout (without the unfamiliar steps' evidence): the phase and its clock are
    # right when the scene is familiar again
    assert {e.phase for e in estimates} == {CALOT} and estimates[-1].time_in_phase_s == pytest.approx(1.6)
    raw = stage.predict(stage.pre_process(_uniform(220), area))
    assert isinstance(raw, PhaseOutputs) and raw.logits.shape == (1, 7)
    stage.reset()  # a new case starts familiar, whatever the last one ended in
    assert stage(_uniform(220), area, 0.0).familiar


def test_an_unfamiliar_scene_is_no_evidence_for_the_phase_filter(tmp_path):
    """Bright frames, far from what the model knows, say "ClippingCutting" confidently. Trusted, a stretch of them
    carries the filter to Clipping (a check that never finds them far shows it); in an unfamiliar scene they are no
    evidence, the belief only moves with time, and Calot is shown when the scene is familiar again."""
    clipping = PHASE_ID["ClippingCutting"]
    area = ContentArea.whole_frame(64, 48)
    values = [40] * 10 + [220] * 15 + [40] * 6
    checked = PhaseStage(OnnxRuntimeBackend(load_manifest(
        _phase_model(tmp_path / "checked", bright_phase=clipping, gain=12.0))))
    never_far = {**FAMILIARITY, "pause_above": 2.0, "resume_below": 1.5}  # distances here are at most 1
    unchecked = PhaseStage(OnnxRuntimeBackend(load_manifest(
        _phase_model(tmp_path / "unchecked", familiarity=never_far, bright_phase=clipping, gain=12.0))))
    with_check = [checked(_uniform(v), area, 0.2 * k) for k, v in enumerate(values)]
    assert [e.raw_phase for e in with_check] == [CALOT if v == 40 else clipping for v in values]  # what the model says
    assert [e.familiar for e in with_check] == [k < 11 or k >= 27 for k in range(len(values))]  # 2 far, 3 near steps
    assert {e.phase for e in with_check} == {CALOT}
    assert with_check[-1].time_in_phase_s == pytest.approx(0.2 * (len(values) - 1))
    without_check = [unchecked(_uniform(v), area, 0.2 * k) for k, v in enumerate(values)]
    assert without_check[24].phase == clipping  # the same frames, trusted: the filter follows them


def test_phase_estimates_validate_the_familiarity_fields():
    probs = (0.1, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"^feature_distance must be a number or None, got nan$"):
        PhaseEstimate(1, PHASES[1], 0.4, probs, 1, 0.0, feature_distance=float("nan"))
    with pytest.raises(ValueError, match=r"^familiar must be True or False, got 1$"):
        PhaseEstimate(1, PHASES[1], 0.4, probs, 1, 0.0, familiar=1)
    assert PhaseEstimate(1, PHASES[1], 0.4, probs, 1, 0.0, feature_distance=float("inf")).familiar


MARKS = {"capture": 0, "preprocess": 1, "inference": 2, "postprocess": 3}


def _result(familiar=True, oob=False, near=False, seq=3, media_ms=1000.0):
    """A frame with a phase, an L-hook touching the cystic duct (near) or none, and a classification."""
    phase = PhaseEstimate(CALOT, PHASES[CALOT], 0.9, (0.02, 0.9, 0.02, 0.02, 0.02, 0.01, 0.01), CALOT, 75.0, "phase",
                          familiar=familiar, feature_distance=0.1 if familiar else 0.9)
    cmap = np.zeros((60, 80), np.uint8)
    cmap[:, :40] = 2  # liver on the left half
    conf = [1.0] * 13
    if near:
        cmap[20:30, 40:50], cmap[20:30, 50:60] = 8, 9  # cystic duct beside the L-hook
    fractions = [float(np.mean(cmap == c)) for c in range(13)]
    seg = SegmentationEstimate(cmap, ContentArea.whole_frame(320, 240), tuple(fractions), tuple(conf), model="anatomy",
                               names=ANATOMY_NAMES)
    return FrameResult(seq=seq, media_ms=media_ms, frame_size=(320, 240), marks_ns=MARKS,
                       visibility=VisibilityEstimate(0.9 if oob else 0.01, 0.01, model="visibility"), phase=phase,
                       segmentations=(seg,), classifications=(ClassificationEstimate("scene", "scene", ("smoke",), (0.2,)),),
                       polygons={"anatomy": {2: [np.array([[0, 0], [100, 0], [100, 100]], np.int32)]}})


def test_the_pause_reason_out_of_body_first_then_the_unfamiliar_scene():
    assert _result().paused_reason is None and not _result().ai_paused
    assert _result(familiar=False).paused_reason == "unfamiliar scene" and _result(familiar=False).ai_paused
    assert _result(familiar=False, oob=True).paused_reason == "camera out of body"


def test_the_overlay_of_an_unfamiliar_scene_says_paused_and_shows_no_model_output():
    shown = overlay_to_pb(_result(), [], [], include_anatomy=True)
    assert not shown.ai_paused and shown.HasField("phase") and shown.anatomy and shown.classifications
    msg = overlay_to_pb(_result(familiar=False), [], [], include_anatomy=True)
    assert msg.ai_paused and msg.paused_reason == "unfamiliar scene"
    assert not msg.HasField("phase") and not msg.anatomy and not msg.classifications
    assert msg.HasField("visibility") and msg.visibility.p_out_of_body == pytest.approx(0.01)  # still sent
    assert overlay_to_pb(_result(familiar=False, oob=True), [], [], True).paused_reason == "camera out of body"


def test_the_picture_of_an_unfamiliar_scene_is_dimmed_and_paused_not_redacted():
    labels = load_manifest(SYNTHETIC / "anatomy").labels
    img = np.full((240, 320, 3), 200, np.uint8)
    out = OverlayRenderer(labels, alpha=0.5).draw(img, _result(familiar=False))
    yellow = (out[..., 2] > 200) & (out[..., 1] > 180) & (out[..., 0] < 60)
    assert yellow.sum() > 200, "AI PAUSED in large yellow letters"
    # on the liver, away from the text: dimmed to 2/5 (not blacked out), and no anatomy drawn
    assert (out[150:175, 5:60] == 80).all()
    live = OverlayRenderer(labels, alpha=0.5).draw(img, _result())
    liver = np.array(labels[2].color[::-1])
    assert np.allclose(live[150:175, 5:60].reshape(-1, 3).mean(0), 0.5 * 200 + 0.5 * liver, atol=3)


def test_no_alert_rests_on_an_unfamiliar_scene():
    engine = RulesEngine(load_rules())  # the reference set's rules: energy_near_cystic_duct (enter 0.4 s)

    def run(familiar, t0, frames=10):
        out = []
        for k in range(frames):
            out += engine.evaluate(RuleInputs.from_result(_result(familiar=familiar, near=True, seq=k, media_ms=t0 + 100.0 * k)))
        return out

    assert run(False, 0.0) == []  # a second of the L-hook at the duct, in a scene the models do not know: nothing
    raised = run(True, 1000.0)
    assert [(t.rule, t.kind) for t in raised] == [("energy_near_cystic_duct", "raised")]
    cleared = run(False, 2000.0, frames=12)  # the scene unfamiliar for the rule's exit_s (1 s): it clears
    assert [(t.rule, t.kind) for t in cleared] == [("energy_near_cystic_duct", "cleared")]


def test_every_shipped_rule_that_reads_the_phase_or_the_anatomy_is_suppressed_in_an_unfamiliar_scene(tmp_path):
    from or_agent.pipelines.model_set import load_model_set

    for name in ("synthetic", "endoscapes"):
        s = load_model_set(name)
        for rule in load_rules(s.rules_file, vocabulary=s.outputs):
            reads_models = rule.kind != "state"  # the state rules read the visibility model and the box
            assert ("unfamiliar_scene" in rule.suppress_when) == reads_models, (name, rule.id)
    # a rule that names no suppressors
    assert load_rules(_toml(tmp_path / "rules.toml", ""))[0].suppress_when == ("out_of_body", "unfamiliar_scene")


def _toml(path, suppress):
    path.write_text('[[rules]]\nid = "long"\nseverity = "info"\nkind = "phase_duration_over"\nmessage = "long"\n' + suppress)
    return path


@pytest.fixture
def paused_video(tmp_path):
    """32 uniform frames at 10 fps: dark (familiar), bright (far), one mid-grey (between the thresholds)."""
    values = [40] * 10 + [220] * 10 + [128] + [40, 40, 220, 40, 40, 40] + [40] * 3 + [220, 40]
    path = tmp_path / "scenes.avi"
    wr = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48), True)
    for v in values:
        wr.write(_uniform(v))
    wr.release()
    return path, values


def test_a_withheld_phase_still_pauses_an_unfamiliar_scene(tmp_path, paused_video):
    """A set that runs its phase model but withholds the phase from the display keeps the model's
    familiarity check: the check guards everything shown, not only the phase."""
    from or_agent.agent.session import LoadedModels
    from or_agent.pipelines.sources import VideoFileSource

    video, values = paused_video
    set_dir = tmp_path / "withholding"
    _phase_model(set_dir / "phase")
    (set_dir / "model-set.json").write_text(json.dumps({
        "schema": "or-agent/model-set/v1", "name": "withholding", "version": "1.0.0",
        "procedure": "laparoscopic-cholecystectomy", "license": "Apache-2.0", "provenance": "a test set",
        "rules": "rules.toml", "models": ["phase"], "withheld": {"phase": "not validated on real video"}}))
    _toml(set_dir / "rules.toml", "")
    models = LoadedModels(str(set_dir), live_session=False)
    try:
        results = []
        pipeline = models.pipeline(VideoFileSource(video))
        pipeline.subscribe(results.append)
        pipeline.run()
    finally:
        models.close()
    assert len(results) == len(values)
    assert all(r.phase is None for r in results)  # withheld: never shown
    expected = ["unfamiliar scene" if 11 <= k <= 25 else None for k in range(len(values))]
    assert [r.paused_reason for r in results] == expected  # as when the phase is shown (the replay test below)
    assert [r.unfamiliar_scene for r in results] == [e is not None for e in expected]


def test_replay_records_the_pause_in_the_timeline_the_summary_and_the_video(tmp_path, paused_video):
    from or_agent.agent.offline.replay import run_replay

    video, values = paused_video
    set_dir = tmp_path / "tiny"
    _phase_model(set_dir / "phase")
    (set_dir / "model-set.json").write_text(json.dumps({
        "schema": "or-agent/model-set/v1", "name": "tiny", "version": "1.0.0", "procedure": "laparoscopic-cholecystectomy",
        "license": "Apache-2.0", "provenance": "a test set", "rules": "rules.toml", "models": ["phase"]}))
    _toml(set_dir / "rules.toml", 'limits_s = {CalotTriangleDissection = 0.35}\nsuppress_when = ["unfamiliar_scene"]\n')
    assert run_replay([str(video)], str(tmp_path / "out"), models_dir=str(set_dir)) == 0
    d = tmp_path / "out" / "scenes"
    rows = list(csv.DictReader((d / "timeline.csv").open()))
    # unfamiliar from the second bright frame (11) until the third dark frame in a row (26)
    expected = ["unfamiliar scene" if 11 <= k <= 25 else "" for k in range(len(values))]
    assert [r["ai_paused"] for r in rows] == expected
    assert {r["phase"] for r in rows} == {"CalotTriangleDissection"}  # the filter ran on
    s = json.loads((d / "summary.json").read_text())
    assert s["paused_s"] == {"camera out of body": 0.0, "unfamiliar scene": 1.5}
    assert [(a["frame"], a["event"]) for a in s["alerts"]] == [(4, "raised"), (11, "cleared"), (26, "raised")]
    assert "unfamiliar scene 1.5 s" in (d / "report.html").read_text()
    cap = cv2.VideoCapture(str(d / "annotated.mp4"))
    means = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        means.append(float(frame[10:20, 2:8].mean()))  # a corner, away from the banners
    cap.release()
    assert len(means) == len(values)
    assert means[15] == pytest.approx(220 * 2 / 5, abs=12)  # paused: dimmed
    assert means[28] == pytest.approx(40, abs=12)
