"""The model store: verified installs (hashes, ed25519 signatures), atomic activation, rollback, and
``build-engines --prune`` keeping the engines of every installed set."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from or_agent.agent import cli
from or_agent.agent.model_signing import DIGEST_NAME, SIGNATURE_NAME, SignatureError, digest_text, keygen, sign
from or_agent.agent.model_store import ModelStore
from or_agent.pipelines.backends import engines
from or_agent.pipelines.errors import InputError, ManifestError
from or_agent.pipelines.gpu.context import GpuInfo
from or_agent.pipelines.manifest import SET_FILE, SETS_ROOT, load_manifest, sha256_of
from or_agent.pipelines.model_set import load_model_set

H200 = GpuInfo("NVIDIA H200", (9, 0), 132, 140 * 1024**3, 13000)
TRT = "11.0.0.9"


def _set_copy(tmp_path: Path, version: str = "1.0.0", name: str = "set") -> Path:
    """The bundled synthetic set (under 1 MB) copied, with its version changed; a new version also gets
    a visibility model file of its own, so the two versions' engines differ."""
    folder = tmp_path / f"{name}-{version}"
    shutil.copytree(SETS_ROOT / "synthetic", folder)
    doc = json.loads((folder / "model-set.json").read_text())
    doc["version"] = version
    (folder / "model-set.json").write_text(json.dumps(doc, indent=2) + "\n")
    if version != "1.0.0":
        onnx = folder / "visibility" / "model.onnx"
        onnx.write_bytes(onnx.read_bytes() + version.encode())  # not run here: only its sha256 matters
        manifest = json.loads((folder / "visibility" / "manifest.json").read_text())
        manifest["sha256"] = sha256_of(onnx)
        (folder / "visibility" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


@pytest.fixture
def keys(tmp_path):
    return keygen(tmp_path / "keys")


def test_install_verifies_hashes_and_copies_as_name_at_version(tmp_path):
    store = ModelStore(tmp_path / "store")
    done = store.install(_set_copy(tmp_path))
    assert (done.label, done.signed_by, done.already_installed) == ("synthetic@1.0.0", None, False)
    assert load_model_set(done.path).version == "1.0.0"
    assert [s.label for s in store.installed()] == ["synthetic@1.0.0"]
    assert store.active() is None
    assert sorted(p.name for p in store.dir.iterdir()) == ["synthetic@1.0.0"]  # no temporary folder left


def test_tampered_model_is_refused_naming_the_file(tmp_path):
    source = _set_copy(tmp_path)
    with open(source / "anatomy" / "model.onnx", "ab") as fh:
        fh.write(b"tampered")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ManifestError) as err:
        store.install(source)
    assert str(err.value).startswith(f"{source / 'anatomy' / 'manifest.json'}: sha256: model.onnx has sha256 ")
    assert str(err.value).endswith("(file changed or corrupt)")
    assert list(store.dir.iterdir()) == []  # never half-installed


def test_signed_set_installs_with_the_trusted_key(tmp_path, keys):
    source = _set_copy(tmp_path)
    digests, signature = sign(source, keys.private_key)
    assert (digests.name, signature.name) == (DIGEST_NAME, SIGNATURE_NAME)
    assert len(signature.read_bytes()) == 64
    assert "  anatomy/model.onnx\n" in digests.read_text()
    assert oct(keys.private_key.stat().st_mode & 0o777) == "0o600"
    done = ModelStore(tmp_path / "store").install(source, trusted_keys=[keys.public_key])
    assert done.signed_by == keys.public_key
    assert (done.path / SIGNATURE_NAME).read_bytes() == signature.read_bytes()
    assert ModelStore(tmp_path / "store").installed()[0].signed


def test_unsigned_set_refused_when_a_key_is_trusted(tmp_path, keys):
    source = _set_copy(tmp_path)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(SignatureError) as err:
        store.install(source, trusted_keys=[keys.public_key])
    assert str(err.value) == (f"{source}: unsigned model set (model-set.sig missing) and this box trusts only signed sets")
    assert list(store.dir.iterdir()) == []


def test_set_signed_with_another_key_is_refused(tmp_path, keys):
    other = keygen(tmp_path / "other-keys")
    source = _set_copy(tmp_path)
    sign(source, other.private_key)
    with pytest.raises(SignatureError) as err:
        ModelStore(tmp_path / "store").install(source, trusted_keys=[keys.public_key])
    assert str(err.value) == (f"{source / SIGNATURE_NAME}: signature does not verify with any trusted key "
                              f"({keys.public_key}): signed by another key, or the digest file was changed")


def test_file_changed_after_signing_is_refused_naming_it(tmp_path, keys):
    source = _set_copy(tmp_path)
    sign(source, keys.private_key)
    rules = source / "rules_cholecystectomy.toml"
    rules.write_text(rules.read_text() + "\n# edited\n")
    with pytest.raises(SignatureError) as err:
        ModelStore(tmp_path / "store").install(source, trusted_keys=[keys.public_key])
    assert str(err.value) == f"{rules}: sha256 differs from {DIGEST_NAME} (file changed after signing)"
    # an unsigned box checks the digests a set carries too
    with pytest.raises(SignatureError, match="file changed after signing"):
        ModelStore(tmp_path / "store").install(source)
    (source / "extra.txt").write_text("x")
    sign(source, keys.private_key)
    (source / "added.txt").write_text("x")
    with pytest.raises(SignatureError) as err:
        ModelStore(tmp_path / "store").install(source, trusted_keys=[keys.public_key])
    assert str(err.value) == f"{source / 'added.txt'}: not listed in {DIGEST_NAME} (file added after signing)"


def test_same_version_with_other_content_is_refused_identical_is_a_no_op(tmp_path):
    store = ModelStore(tmp_path / "store")
    source = _set_copy(tmp_path)
    store.install(source)
    assert store.install(source).already_installed
    (source / "NOTES.txt").write_text("changed")
    with pytest.raises(InputError) as err:
        store.install(source)
    assert str(err.value) == ("synthetic@1.0.0 is already installed with different content: a changed set needs a "
                              "new version in its model-set.json")


def _sharing_set(root: Path) -> Path:
    """The bundled sets copied under ``root``, the endoscapes copy sharing the synthetic set's phase model."""
    shutil.copytree(SETS_ROOT / "endoscapes", root / "endoscapes")
    shutil.copytree(SETS_ROOT / "synthetic", root / "synthetic")
    manifest = json.loads((root / "endoscapes" / SET_FILE).read_text())
    manifest["models"] = ["anatomy", "../synthetic/phase"]
    (root / "endoscapes" / SET_FILE).write_text(json.dumps(manifest))
    for own in (root / "endoscapes").iterdir():
        if own.is_dir() and own.name != "anatomy":
            shutil.rmtree(own)
    return root / "endoscapes"


def test_a_set_sharing_models_is_installed_with_its_own_copies_unless_signed(tmp_path):
    """A set that shares another set's model: its installed copy holds it itself (the store never points
    outside it), with every sha256 checked."""
    store = ModelStore(tmp_path / "store")
    sharing = _sharing_set(tmp_path / "plain")
    result = store.install(sharing)
    installed = load_model_set(result.path, verify=True)
    assert sorted(p.name for p in result.path.iterdir() if p.is_dir()) == ["anatomy", "phase"]
    assert {m.path.parent.resolve().parent for m in installed.models} == {result.path.resolve()}
    assert json.loads((sharing / SET_FILE).read_text())["models"][1] == "../synthetic/phase"  # source untouched
    # a signed set's signature covers its own folder only: sharing models is refused
    signed = _sharing_set(tmp_path / "signed")
    (signed / "model-set.sha256").write_text(digest_text(signed))
    with pytest.raises(InputError, match=r"models: \.\./synthetic/phase is shared with another set, outside what its "
                                         r"signature covers; a signed set must hold its own models"):
        ModelStore(tmp_path / "store2").install(signed)


def test_activate_and_rollback_switch_what_the_active_path_loads(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.install(_set_copy(tmp_path, "1.0.0"))
    store.install(_set_copy(tmp_path, "2.0.0"))
    with pytest.raises(InputError, match=r"^.*: no previous model set to roll back to$"):
        store.rollback()
    assert store.activate("synthetic@1.0.0") == ("synthetic@1.0.0", None)
    assert load_model_set(store.active_path).version == "1.0.0"
    assert store.activate("synthetic@2.0.0") == ("synthetic@2.0.0", "synthetic@1.0.0")
    assert load_model_set(store.active_path).version == "2.0.0"
    assert (store.active(), store.previous()) == ("synthetic@2.0.0", "synthetic@1.0.0")
    assert os.readlink(store.active_path) == "synthetic@2.0.0"  # relative: the store can move
    assert store.rollback() == ("synthetic@1.0.0", "synthetic@2.0.0")
    assert load_model_set(str(store.active_path)).version == "1.0.0"  # as --models STORE/active names it
    assert [(s.label, s.active, s.previous) for s in store.installed()] == [
        ("synthetic@1.0.0", True, False), ("synthetic@2.0.0", False, True)]
    assert sorted(p.name for p in store.dir.iterdir()) == ["active", "previous", "synthetic@1.0.0", "synthetic@2.0.0"]
    with pytest.raises(InputError) as err:
        store.activate("synthetic@3.0.0")
    assert str(err.value) == (f"synthetic@3.0.0: not installed in {store.dir} "
                              "(installed: synthetic@1.0.0, synthetic@2.0.0)")


def test_activation_refuses_a_set_damaged_after_install(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.install(_set_copy(tmp_path, "1.0.0"))
    store.install(_set_copy(tmp_path, "2.0.0"))
    store.activate("synthetic@1.0.0")
    with open(store.dir / "synthetic@2.0.0" / "phase" / "model.onnx", "ab") as fh:
        fh.write(b"bitrot")
    with pytest.raises(ManifestError, match="file changed or corrupt"):
        store.activate("synthetic@2.0.0")
    assert store.active() == "synthetic@1.0.0"


def test_cli_install_activate_rollback_list(tmp_path, keys, capsys):
    store = str(tmp_path / "store")
    v1, v2 = _set_copy(tmp_path, "1.0.0"), _set_copy(tmp_path, "2.0.0")
    assert cli.main(["models", "sign", str(v1), "--key", str(keys.private_key)]) == 0
    config = tmp_path / "agent.toml"
    config.write_text(f'[models]\nstore = "{store}"\ntrusted_keys = ["{keys.public_key}"]\n')
    assert cli.main(["models", "install", str(v1), "--config", str(config)]) == 0
    assert cli.main(["models", "install", str(v2), "--config", str(config)]) == 2  # unsigned: refused
    assert cli.main(["models", "install", str(v2), "--store", store]) == 0  # no trusted key: hashes only
    assert cli.main(["models", "activate", "synthetic@2.0.0", "--store", store]) == 0
    assert cli.main(["models", "activate", "synthetic@1.0.0", "--store", store]) == 0
    assert cli.main(["models", "rollback", "--store", store]) == 0
    capsys.readouterr()
    assert cli.main(["models", "list", "--store", store]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "  synthetic@1.0.0                  signed   previous",
        "* synthetic@2.0.0                  unsigned active",
    ]
    assert cli.main(["models", "--models", f"{store}/active"]) == 0  # the plain listing, as before
    assert "set   synthetic 2.0.0" in capsys.readouterr().out


def _fake_engine(cache: engines.EngineCache, sha256: str) -> Path:
    key = engines.EngineKey(sha256, TRT, H200.name, H200.compute_capability, H200.multiprocessors)
    return cache.write(key, b"serialized engine", model="m")


def test_build_engines_prune_keeps_every_installed_sets_engines(tmp_path, monkeypatch, capsys):
    import or_agent.pipelines.gpu.context as gpu_context

    store = ModelStore(tmp_path / "store")
    store.install(_set_copy(tmp_path, "1.0.0"))
    store.install(_set_copy(tmp_path, "2.0.0"))
    store.activate("synthetic@1.0.0")
    store.activate("synthetic@2.0.0")
    cache = engines.EngineCache(tmp_path / "engines")
    active = [load_manifest(p) for p in sorted(store.active_path.glob("*/manifest.json"))]
    for m in active:  # what build-engines would have built for the active set
        cache.write(engines.EngineKey.for_model(m, H200, TRT), b"serialized engine", model=m.name)
    previous_visibility = load_manifest(store.dir / "synthetic@1.0.0" / "visibility")
    kept = _fake_engine(cache, previous_visibility.sha256)
    stale = _fake_engine(cache, "f" * 64)  # a model no installed set has
    monkeypatch.setattr(gpu_context, "gpu_info", lambda: H200)
    monkeypatch.setattr(engines, "tensorrt_version", lambda: TRT)
    assert cli.main(["build-engines", "--models", str(store.active_path), "--cache-dir", str(cache.dir),
                     "--store", str(store.dir), "--prune"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"removed {stale.name}"
    assert sum(line.startswith("ok    ") for line in out) == 3
    assert kept.is_file() and not stale.is_file() and not stale.with_suffix(".json").exists()
    assert len(cache.entries()) == 4  # the active set's three and the previous set's own visibility engine
