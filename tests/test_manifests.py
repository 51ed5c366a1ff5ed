"""Manifests: the shipped ones validate and match their files; broken ones are named precisely."""

import json
import shutil

import pytest

from or_agent.pipelines.errors import ManifestError
from or_agent.pipelines.manifest import discover, find_model, load_manifest, sha256_of
from tests.conftest import ROOT, run_cli

SHIPPED = ROOT / "models" / "synthetic"


def test_shipped_manifests_validate_and_hashes_match():
    paths = discover(SHIPPED)
    assert {p.parent.name for p in paths} == {"anatomy", "phase", "visibility"}
    for p in paths:
        m = load_manifest(p)
        m.verify_file()
        assert m.model_path.stat().st_size < 10 * 1024 * 1024
        assert m.training["command"].startswith("python -m or_agent.models.training.train")
        assert m.metrics, f"{p}: no held-out metrics recorded"
    assert find_model("phase", SHIPPED).state_inputs[0].name == "state_in"


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "models"
    shutil.copytree(SHIPPED / "visibility", dst / "visibility")
    return dst / "visibility"


def _edit(model_dir, change):
    path = model_dir / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("change, field, problem", [
    (lambda d: d.pop("sha256"), "sha256", "missing"),
    (lambda d: d.update(task="detector"), "task", "must be one of"),
    (lambda d: d["input"].update(shape=[1, 3, 64]), "input.shape", "must be [1, 3, height, width]"),
    (lambda d: d["input"].update(color_order="HSV"), "input", "color_order must be RGB or BGR"),
    (lambda d: d["input"].update(mean="0.5"), "input.mean", "must be list"),
    (lambda d: d["labels"][1].update(color=[0, 0, 300]), "labels[1]", "color must be three values"),
    (lambda d: d.update(schema="v0"), "schema", "unsupported schema"),
    (lambda d: d["outputs"].clear(), "outputs", "at least one output"),
])
def test_malformed_manifest_names_file_and_field(model_copy, change, field, problem):
    path = _edit(model_copy, change)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {field}: ") and problem in msg


def test_invalid_json_is_reported_with_position(model_copy):
    (model_copy / "manifest.json").write_text('{"schema": ')
    with pytest.raises(ManifestError, match=r"manifest.json: not valid JSON \(line 1, column 12"):
        load_manifest(model_copy)


def test_changed_model_file_fails_hash_check(model_copy):
    with open(model_copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match=r"manifest.json: sha256: model.onnx has sha256 .* manifest says"):
        load_manifest(model_copy).verify_file()


def test_models_command_lists_and_verifies():
    proc = run_cli("models", "--models-dir", str(SHIPPED), check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and lines[0].startswith("set   synthetic 1.0.0 (laparoscopic-cholecystectomy), licence Apache-2.0; "
                                                   "rules rules_cholecystectomy.toml checked against 13 classes")
    assert all(line.startswith("ok ") for line in lines[1:])
    assert "anatomy 1.0.0 (segmentation, every frame) input frame 1x3x256x448 RGB, 13 labels" in proc.stdout
    assert "phase 1.0.0 (phase, 5 Hz)" in proc.stdout and "licence Apache-2.0" in lines[1]


def test_models_command_reports_a_tampered_model(model_copy):
    with open(model_copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    proc = run_cli("models", "--models-dir", str(model_copy.parent))
    assert proc.returncode == 3
    assert proc.stdout.startswith("FAIL  ") and "sha256" in proc.stdout and "Traceback" not in proc.stderr


def test_models_command_on_a_missing_directory(tmp_path):
    proc = run_cli("models", "--models-dir", str(tmp_path / "nope"))
    assert proc.returncode == 3
    assert proc.stderr.strip() == (f"or-agent: error: {tmp_path / 'nope'}: no such model set or models directory "
                                   "(bundled sets: endoscapes, synthetic)")


def test_sha256_of_matches_hashlib(tmp_path):
    import hashlib

    p = tmp_path / "f"
    p.write_bytes(b"x" * 3_000_000)
    assert sha256_of(p) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
