"""Model sets: a set is checked as a whole when it loads, and selected by name or folder."""

import json
import shutil

import pytest

from or_agent.pipelines.errors import InputError, ManifestError
from or_agent.pipelines.manifest import Task, load_manifest, resolve_models_dir
from or_agent.pipelines.model_set import load_model_set
from or_agent.pipelines.schedule import Cadence
from tests.conftest import ROOT, run_cli

SYNTHETIC = ROOT / "models" / "synthetic"


@pytest.fixture
def set_copy(tmp_path):
    dst = tmp_path / "myset"
    shutil.copytree(SYNTHETIC, dst)
    return dst


def _edit(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_the_bundled_set_loads_by_name_with_its_rules_and_cadences():
    s = load_model_set("synthetic")
    assert (s.name, s.procedure, s.license, s.declared) == ("synthetic", "laparoscopic-cholecystectomy", "Apache-2.0", True)
    assert s.rules_file == SYNTHETIC / "rules_cholecystectomy.toml"
    assert [m.task for m in s.models] == [Task.SEGMENTATION, Task.PHASE, Task.VISIBILITY]
    assert s.model(Task.PHASE).cadence == Cadence(hz=5.0) and str(s.model("phase").cadence) == "5 Hz"
    assert s.model(Task.SEGMENTATION).cadence.every_frame and len(s.class_names) == 13
    for m in s.models:
        assert m.license == "Apache-2.0" and m.datasets and "synth" in m.datasets[0].attribution
    assert resolve_models_dir(None) == SYNTHETIC == resolve_models_dir(str(SYNTHETIC))


def test_a_rule_naming_a_class_no_model_has_is_refused_at_load(set_copy):
    rules = set_copy / "rules_cholecystectomy.toml"
    rules.write_text(rules.read_text().replace('classes = ["L-hook Electrocautery", "Cystic Duct"]',
                                               'classes = ["L-hook Electrocautery", "Cystic Artery"]'))
    with pytest.raises(InputError) as e:
        load_model_set(set_copy)
    assert ("rules.energy_near_cystic_duct.classes: unknown anatomy class 'Cystic Artery': "
            "no model of model set 'synthetic' has it") in str(e.value)


def test_a_plain_models_directory_is_a_set_with_the_built_in_rules(tmp_path):
    for name in ("anatomy", "phase", "visibility"):
        shutil.copytree(SYNTHETIC / name, tmp_path / "plain" / name)
    s = load_model_set(tmp_path / "plain")
    assert not s.declared and s.name == "plain" and s.rules_file == SYNTHETIC / "rules_cholecystectomy.toml"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("license"), "license: missing"),
    (lambda d: d.update(datasets=[]), "datasets: must list the datasets the model was trained on"),
    (lambda d: d.update(datasets=[{"name": "x", "license": "CC-BY-NC-SA-4.0"}]), "datasets[0].attribution: missing"),
    (lambda d: d.pop("cadence"), "cadence: missing"),
    (lambda d: d.update(cadence="often"), "cadence: cadence must be 'every frame', 'every K frames' or 'N Hz', got 'often'"),
])
def test_model_manifests_must_say_licence_datasets_and_cadence(set_copy, change, message):
    path = set_copy / "phase" / "manifest.json"
    _edit(path, change)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema="x"), "schema: unsupported schema 'x' (expected 'or-agent/model-set/v1')"),
    (lambda d: d.update(procedure="appendectomy"), "procedure: must be one of laparoscopic-cholecystectomy, got 'appendectomy'"),
    (lambda d: d.update(models=["anatomy", "phase", "nowhere"]), "models: nowhere/manifest.json does not exist"),
    (lambda d: d.pop("rules"), "rules: missing"),
    (lambda d: d.update(withheld={"anatomy": "not validated"}), "withheld: must map phase to the reason it is not shown"),
])
def test_set_manifest_errors_name_the_field(set_copy, change, message):
    _edit(set_copy / "model-set.json", change)
    with pytest.raises(ManifestError) as e:
        load_model_set(set_copy)
    assert str(e.value) == f"{set_copy / 'model-set.json'}: {message}"


def test_a_set_needs_no_phase_model_but_at_least_one_model(set_copy):
    """Any task may be absent (a set of segmentation models only is a set); an empty one is refused."""
    _edit(set_copy / "model-set.json", lambda d: d.update(models=["anatomy", "visibility"]))
    assert [m.task for m in load_model_set(set_copy).models] == [Task.SEGMENTATION, Task.VISIBILITY]
    _edit(set_copy / "model-set.json", lambda d: d.update(models=[]))
    with pytest.raises(ManifestError, match="models: must list the set's model folders"):
        load_model_set(set_copy)


def test_models_option_takes_a_set_name_and_names_the_bundled_sets_when_unknown(tmp_path):
    proc = run_cli("models", "--models", "synthetic", check=True)
    assert proc.stdout.startswith("set   synthetic 1.0.0")
    proc = run_cli("models", "--models", "no-such-set")
    assert proc.returncode == 3
    assert proc.stderr.strip() == ("or-agent: error: no-such-set: no such model set or models directory "
                                   "(bundled sets: endoscapes, synthetic)")


def test_models_command_reports_a_set_whose_rules_do_not_fit(set_copy):
    rules = set_copy / "rules_cholecystectomy.toml"
    rules.write_text(rules.read_text().replace('"Cystic Duct"]', '"Spleen"]'))
    proc = run_cli("models", "--models", str(set_copy))
    assert proc.returncode == 3
    assert proc.stdout.startswith("FAIL  set myset: ") and "unknown anatomy class 'Spleen'" in proc.stdout
