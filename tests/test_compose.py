"""A pipeline composed from whatever models a set holds: two segmentation models and an image-level
classifier beside the phase and visibility models, each named on its results, on the wire and in the
rules; and the agent's own (system) alerts raised and cleared by the rules engine like any other."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from or_agent.pipelines.backends.onnxruntime import OnnxRuntimeBackend
from or_agent.pipelines.errors import InputError, ManifestError, ModelError
from or_agent.pipelines.manifest import Task, load_manifest
from or_agent.pipelines.model_set import load_model_set
from or_agent.pipelines.rules import RulesEngine, load_rules, system_rules
from or_agent.pipelines.runtime import Pipeline
from or_agent.pipelines.sources import FirstFrames, VideoFileSource
from or_agent.pipelines.stages import ClassificationStage, compose
from tests.conftest import ROOT

SYNTHETIC = ROOT / "models" / "synthetic"
LABELS = ("smoke", "bleeding", "clip_applier")


def _classifier_onnx(path, height=64, width=112):
    """A real ONNX classifier: global average of the RGB input, then a fixed linear layer to 3 logits, so
    its probabilities follow from the frame's mean colour (known ground truth for any frame)."""
    import onnx
    from onnx import TensorProto, helper

    weights = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, -4.0]], np.float32)  # [3 channels, 3 labels]
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["frame"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["label_logits"])],
        "classifier",
        [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("label_logits", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 3], weights.ravel().tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _add_classifier(set_dir, name="scene", cadence="every 5 frames"):
    folder = set_dir / name
    folder.mkdir()
    _classifier_onnx(folder / "model.onnx")
    doc = json.loads((SYNTHETIC / "visibility" / "manifest.json").read_text())
    doc.update(name=name, task="classification", cadence=cadence,
               sha256=hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest(),
               outputs=[{"name": "label_logits", "shape": [1, 3], "meaning": "independent logits per label"}],
               labels=[{"id": i, "name": n, "color": [200, 200, 200]} for i, n in enumerate(LABELS)])
    doc.pop("training", None)
    doc.pop("metrics", None)
    (folder / "manifest.json").write_text(json.dumps(doc, indent=1))
    return folder


def _add_second_segmentation(set_dir, name="anatomy-b"):
    """The reference anatomy model once more under another name (a hospital's second segmentation model)."""
    shutil.copytree(SYNTHETIC / "anatomy", set_dir / name)
    manifest = set_dir / name / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["name"] = name
    manifest.write_text(json.dumps(doc, indent=1))


@pytest.fixture
def big_set(tmp_path):
    """The synthetic set with a second segmentation model and an image-level classifier."""
    dst = tmp_path / "bigset"
    shutil.copytree(SYNTHETIC, dst)
    _add_second_segmentation(dst)
    _add_classifier(dst)
    doc = json.loads((dst / "model-set.json").read_text())
    doc["name"] = "bigset"
    doc["models"] += ["anatomy-b", "scene"]
    (dst / "model-set.json").write_text(json.dumps(doc, indent=1))
    (dst / "rules_cholecystectomy.toml").write_text((dst / "rules_cholecystectomy.toml").read_text()
                                                    .replace('"Cystic Duct"', '"anatomy.Cystic Duct"')
                                                    .replace('"L-hook Electrocautery"', '"anatomy.L-hook Electrocautery"')
                                                    .replace('"Blood"', '"anatomy-b.Blood"'))
    return dst


def test_a_set_with_two_segmentation_models_and_a_classifier_runs_them_all_on_their_cadences(big_set, small_dataset):
    s = load_model_set(big_set)
    assert [m.task for m in s.models] == [Task.SEGMENTATION, Task.PHASE, Task.VISIBILITY, Task.SEGMENTATION,
                                          Task.CLASSIFICATION]
    graph = compose([OnnxRuntimeBackend(m) for m in s.models])
    assert [st.name for st in graph.light] == ["visibility", "phase", "scene"]  # the gate first
    assert [st.name for st in graph.heavy] == ["anatomy", "anatomy-b"]
    results = []
    pipe = Pipeline(FirstFrames(VideoFileSource(small_dataset / "video01.mp4"), 60), graph)
    pipe.subscribe(results.append)
    try:
        pipe.run()
    finally:
        graph.close()
    assert [r.seq for r in results] == list(range(60))
    inside = [r for r in results if not r.out_of_body]
    assert inside, "the clip starts inside the body"
    for r in inside:
        assert [seg.model for seg in r.segmentations] == ["anatomy", "anatomy-b"]
        a, b = r.segmentations
        # the same network under two names: the same class map, each estimate naming its own model
        assert np.array_equal(a.class_map, b.class_map) and a.names == b.names
        (c,) = r.classifications
        assert (c.model, c.name, c.labels) == ("scene", "scene", LABELS)
    # every 5th frame of media time for the classifier, every frame for the segmentations
    fresh_scene = [r.seq for r in results if "scene" in r.fresh]
    assert fresh_scene and all(s % 5 == 0 for s in fresh_scene)
    assert all({"anatomy", "anatomy-b"} <= r.fresh for r in inside)


def test_a_classifier_reads_the_frame_as_its_onnx_graph_says(tmp_path):
    folder = _add_classifier(tmp_path)
    stage = ClassificationStage(OnnxRuntimeBackend(load_manifest(folder)))
    from or_agent.pipelines.preprocess import ContentArea

    red = np.zeros((64, 112, 3), np.uint8)
    red[..., 2] = 255  # BGR: pure red
    est = stage(red, ContentArea.whole_frame(112, 64))
    # normalised red channel mean (1 - 0.485) / 0.229 = 2.249 -> logit 9.0; green, blue at their negative means
    expected = 1 / (1 + np.exp(-np.array([4 * (1 - 0.485) / 0.229, 4 * -0.456 / 0.224, -4 * -0.406 / 0.225])))
    assert np.allclose(est.probabilities, expected, atol=1e-4)
    assert est.probability("smoke") > 0.99 and est.probability("bleeding") < 0.01


def test_the_wire_and_the_drawing_carry_every_model(big_set, small_dataset):
    from or_agent.agent.session import LoadedModels
    from or_agent.agent.wire import overlay_to_pb
    from or_agent.pipelines.overlay import OverlayRenderer
    from or_agent.pipelines.runtime import PipelineConfig

    models = LoadedModels(str(big_set), backend="onnxruntime")
    try:
        pipe = models.pipeline(FirstFrames(VideoFileSource(small_dataset / "video01.mp4"), 12),
                               PipelineConfig(encode_polygons=True))
        results = []
        pipe.subscribe(results.append)
        pipe.run()
        r = next(r for r in reversed(results) if not r.out_of_body)
        msg = overlay_to_pb(r, [], [], True, model_set="bigset")
        assert {reg.model for reg in msg.anatomy} == {"anatomy", "anatomy-b"}
        assert [(c.model, c.name, [lab.label for lab in c.labels]) for c in msg.classifications] == [
            ("scene", "scene", list(LABELS))]
        drawn = OverlayRenderer.for_models(models.model_set.models).draw(r.image, r)
        assert (drawn != r.image).any()
    finally:
        models.close()


def test_rules_name_classes_by_model_and_labels_by_output(big_set):
    s = load_model_set(big_set)
    rules = big_set / "rules.toml"
    base = 'id = "r"\nseverity = "warning"\nmessage = "m"\n'
    rules.write_text('[[rules]]\n' + base + 'kind = "area_growth"\nclass = "Blood"\ngrowth = 0.01\nwindow_s = 5.0\n')
    with pytest.raises(InputError) as e:
        load_rules(rules, vocabulary=s.outputs, owner="model set 'bigset'")
    assert str(e.value) == (f"{rules}: rules.r.class: anatomy class 'Blood' is ambiguous: models anatomy, anatomy-b have it "
                            "(write anatomy.Blood)")
    rules.write_text('[[rules]]\n' + base + 'kind = "distance_below"\nclasses = ["anatomy.Liver", "anatomy-b.Fat"]\n'
                     'threshold_px = 5.0\n')
    with pytest.raises(InputError, match="both classes must be of one segmentation model"):
        load_rules(rules, vocabulary=s.outputs)
    rules.write_text('[[rules]]\n' + base + 'kind = "label_probability"\nlabel = "scene.fog"\nabove = 0.5\n')
    with pytest.raises(InputError, match="unknown label 'scene.fog'.*known: smoke, bleeding, clip_applier"):
        load_rules(rules, vocabulary=s.outputs, owner="model set 'bigset'")


def test_a_label_probability_rule_reads_the_classifier_on_real_frames(big_set, small_dataset):
    """The classifier's 'smoke' label follows the frame's red; a rule on it fires exactly where its
    probability is at least the threshold."""
    from or_agent.agent.session import LoadedModels
    from or_agent.pipelines.runtime import PipelineConfig

    (big_set / "rules.toml").write_text('[[rules]]\nid = "smoke"\nseverity = "info"\nkind = "label_probability"\n'
                                        'label = "smoke"\nabove = 0.5\nexit_s = 0.0\nmessage = "smoke {probability}"\n')
    models = LoadedModels(str(big_set), backend="onnxruntime")
    try:
        engine = RulesEngine(models.rules(str(big_set / "rules.toml")))
        pipe = models.pipeline(FirstFrames(VideoFileSource(small_dataset / "video01.mp4"), 40), PipelineConfig())
        seen = []
        pipe.subscribe(lambda r: seen.append((r, engine.on_result(r))))
        pipe.run()
    finally:
        models.close()
    for r, transitions in seen:
        fired = [t for t in transitions if t.rule == "smoke" and t.kind == "raised"]
        if fired:
            c = next(c for c in r.classifications if c.name == "scene")
            assert c.probability("smoke") >= 0.5 and fired[0].evidence["probability"] == str(round(c.probability("smoke"), 2))
    active = False
    for r, transitions in seen:  # raised and cleared exactly as the probability crosses 0.5
        for t in transitions:
            active = t.kind == "raised" if t.rule == "smoke" else active
        c = next((c for c in r.classifications if c.name == "scene"), None)
        if c is not None and not r.out_of_body:
            assert active == (c.probability("smoke") >= 0.5)


def test_a_set_with_two_phase_models_or_two_models_of_one_name_is_refused(big_set):
    doc = json.loads((big_set / "model-set.json").read_text())
    shutil.copytree(SYNTHETIC / "phase", big_set / "phase2")
    m = json.loads((big_set / "phase2" / "manifest.json").read_text())
    m["name"] = "phase2"
    (big_set / "phase2" / "manifest.json").write_text(json.dumps(m))
    (big_set / "model-set.json").write_text(json.dumps({**doc, "models": doc["models"] + ["phase2"]}))
    with pytest.raises(ManifestError, match=r"more than one phase model installed \(phase, phase2\): a set has at most one"):
        load_model_set(big_set)
    m["name"], m["task"] = "anatomy", "phase"
    (big_set / "phase2" / "manifest.json").write_text(json.dumps(m))
    (big_set / "model-set.json").write_text(json.dumps({**doc, "models": ["anatomy", "visibility", "phase2"]}))
    with pytest.raises(ManifestError, match="two models are named 'anatomy'"):
        load_model_set(big_set)
    with pytest.raises(ModelError, match="a pipeline needs at least one model"):
        compose([])


def test_system_states_raise_and_clear_the_built_in_system_rules():
    engine = RulesEngine(load_rules() + system_rules())
    raised = engine.set_system(source_lost="capture card unplugged")
    assert [(t.rule, t.kind, t.severity, t.message) for t in raised] == [
        ("source_lost", "raised", "critical", "video source lost: capture card unplugged")]
    assert engine.set_system(source_lost="capture card unplugged") == []  # still holds: nothing new
    (stalled,) = engine.set_system(stale="no fresh AI result for 2.0 s")
    assert (stalled.rule, stalled.message) == ("ai_stalled", "AI unavailable: no fresh AI result for 2.0 s")
    cleared = engine.set_system(source_lost="", stale="")
    assert sorted((t.rule, t.kind) for t in cleared) == [("ai_stalled", "cleared"), ("source_lost", "cleared")]
    with pytest.raises(ValueError, match="unknown system state 'smoke'"):
        engine.set_system(smoke="yes")


def test_a_damaged_audit_trail_is_a_system_warning():
    engine = RulesEngine(load_rules() + system_rules())
    (raised,) = engine.set_system(audit_damaged="audit-000001.jsonl:7: hash mismatch (record edited)")
    assert (raised.rule, raised.kind, raised.severity, raised.message) == (
        "audit_damaged", "raised", "warning", "audit trail damaged: audit-000001.jsonl:7: hash mismatch (record edited)")
    (cleared,) = engine.set_system("the trail verifies", audit_damaged="")
    assert (cleared.rule, cleared.kind) == ("audit_damaged", "cleared") and cleared.message.endswith(": the trail verifies")


def test_a_set_rule_cannot_take_a_system_rule_id(tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('[[rules]]\nid = "source_lost"\nseverity = "info"\nkind = "state"\nstate = "out_of_body"\nmessage = "m"\n')
    with pytest.raises(InputError, match="rules: duplicate rule id 'source_lost'"):
        RulesEngine(load_rules(rules) + system_rules())
