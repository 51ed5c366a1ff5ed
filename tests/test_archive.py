"""``or-agent archive``: cases listed with unique ids, replayed on a local Ray (one failing video reported,
the rest done), a rerun that skips what is done and redoes what changed, and the cohort report's figures
against the per-case outputs and against hand-made cases with known answers."""

import csv
import io
import json
import logging
import shutil
import sys

import pytest

from or_agent.pipelines.errors import DependencyError, InputError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three short synthetic surgeries: two called video01.mp4 in per-case subfolders, one at the top; and
    a file that is no video."""
    from or_agent.synth.dataset import SynthConfig, write_dataset

    synth = tmp_path_factory.mktemp("archive-synth")
    write_dataset(synth, SynthConfig(videos=3, seed=7, time_scale=800.0, width=160, height=128, mask_every=100))
    root = tmp_path_factory.mktemp("archive-in")
    for case, index, name in (("caseA", 1, "video01"), ("caseB", 2, "video01"), (".", 3, "video03")):
        (root / case).mkdir(exist_ok=True)
        for suffix in (".mp4", "-phase.txt", ".json"):
            shutil.copy(synth / f"video{index:02d}{suffix}", root / case / f"{name}{suffix}")
    (root / "broken.mp4").write_text("this is not a video\n")
    return root


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="archive run needs Ray: pip install -e '.[archive]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def first_run(archive, ray_session, tmp_path_factory):
    from or_agent.agent.archive.run import ArchiveOptions, run_archive

    out = tmp_path_factory.mktemp("archive-out")
    log = io.StringIO()
    outcome = run_archive([str(archive)], ArchiveOptions(out=out, workers=2, retries=1), stream=log)
    return out, outcome, log.getvalue()


GOOD = {"caseA__video01", "caseB__video01", "video03"}


def test_cases_get_unique_ids_and_their_labels(archive, tmp_path):
    from or_agent.agent.archive.sources import list_cases

    cases = {c.case_id: c for c in list_cases([str(archive)])}
    assert set(cases) == GOOD | {"broken"}
    assert cases["caseA__video01"].labels == archive / "caseA" / "video01-phase.txt"
    assert cases["caseB__video01"].video == archive / "caseB" / "video01.mp4"
    # named directly, two files called video01.mp4 are told apart by their folders
    direct = list_cases([str(archive / "caseA" / "video01.mp4"), str(archive / "caseB" / "video01.mp4")])
    assert [c.case_id for c in direct] == ["caseA__video01", "caseB__video01"]
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"path,case_id,labels\n{archive}/caseA/video01.mp4,LC-0001,\n"
                        f"{archive}/video03.mp4,LC-0002,{archive}/video03-phase.txt\n")
    by_manifest = list_cases([str(manifest)])
    assert [(c.case_id, c.labels) for c in by_manifest] == [("LC-0001", archive / "caseA" / "video01-phase.txt"),
                                                            ("LC-0002", archive / "video03-phase.txt")]
    manifest.write_text(f"path,case_id\n{archive}/caseA/video01.mp4,LC-0001\n{archive}/video03.mp4,LC-0001\n")
    with pytest.raises(InputError, match=f"^{manifest}:3: case id 'LC-0001' repeats line 2$"):
        list_cases([str(manifest)])
    with pytest.raises(InputError, match="^no sources given"):
        list_cases([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no video files in it or its subfolders"):
        list_cases([str(tmp_path / "empty")])


def test_every_case_is_replayed_and_the_broken_one_reported(first_run, archive):
    from or_agent.agent.archive.run import DONE_FILE

    out, outcome, log = first_run
    assert set(outcome.replayed) == GOOD and outcome.skipped == []
    assert outcome.failures == [{"case_id": "broken", "video": str(archive / "broken.mp4"), "attempts": 2,
                                 "error": f"{archive / 'broken.mp4'}: not a video OpenCV can decode (it is a text file)"}]
    assert json.loads((out / "failures.json").read_text())["failures"] == outcome.failures
    for case in GOOD:
        done = json.loads((out / case / DONE_FILE).read_text())
        summary = json.loads((out / case / "summary.json").read_text())
        assert done["case_id"] == case and done["frames"] == summary["frames"] > 0
        assert done["model_set"]["name"] == "synthetic" and set(done["input"]) == {"size", "sha256_head_tail"}
        assert "phase_metrics" in summary  # labels found next to the video
    assert sorted(p.name for p in out.iterdir()) == sorted(GOOD | {"failures.json"})  # no temporary folder left
    assert "retry  broken (attempt 1 failed:" in log and "FAILED broken (" in log
    assert "3 of 4 cases replayed, 0 skipped as already done, 1 failed" in log
    assert "videos/h" in log and "frames/s" in log and "ETA" in log


def _frames_and_correct(summary, key):
    per = summary["phase_metrics"][key]
    frames = sum(m["frames"] for m in per["per_phase"].values())
    return frames, per["accuracy"] * frames


def test_cohort_report_figures_match_the_case_outputs(first_run, tmp_path):
    from or_agent.agent.archive.report import write_cohort_report

    out, _, _ = first_run
    report = write_cohort_report(out, tmp_path)
    assert json.loads((tmp_path / "cohort.json").read_text()) == report
    summaries = {c: json.loads((out / c / "summary.json").read_text()) for c in GOOD}
    assert report["cases"] == 3 and [f["case_id"] for f in report["failed"]] == ["broken"]
    by_case = {c["case_id"]: c for c in report["per_case"]}
    for case, s in summaries.items():
        raised = [a for a in s["alerts"] if a["event"] == "raised"]
        assert by_case[case]["frames"] == s["frames"]
        assert sum(by_case[case]["alerts_by_rule"].values()) == len(raised)
        assert by_case[case]["alerts_by_severity"]["info"] == sum(a["severity"] == "info" for a in raised)
        assert by_case[case]["out_of_body_s"] == round(s["out_of_body_frames"] / s["fps"], 3)
        assert by_case[case]["strict_accuracy"] == s["phase_metrics"]["strict"]["accuracy"]
        assert by_case[case]["official_accuracy"] == s["phase_metrics"]["relaxed"]["accuracy"]
        assert sum(by_case[case]["phase_durations_s"].values()) == pytest.approx(s["duration_s"], abs=0.01)
    for name, key in (("strict", "strict"), ("official", "relaxed")):
        frames, correct = map(sum, zip(*(_frames_and_correct(s, key) for s in summaries.values())))
        assert report["phase_metrics"][name]["accuracy_pooled"] == round(correct / frames, 4)
    assert report["model_versions"] == {m: {"1.0.0": 3} for m in ("anatomy", "phase", "visibility")}
    rows = list(csv.DictReader((tmp_path / "cases.csv").open()))
    assert sorted(r["case_id"] for r in rows) == sorted(GOOD)
    page = (tmp_path / "cohort.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Failed cases" in page


def test_rerun_skips_what_is_done_and_redoes_what_changed(first_run, archive, ray_session):
    from or_agent.agent.archive.run import DONE_FILE, ArchiveOptions, run_archive

    out, _, _ = first_run
    before = {c: (out / c / DONE_FILE).stat().st_mtime_ns for c in GOOD}
    (out / ".tmp-video03-deadbeef").mkdir()  # what a killed run leaves half-written
    shutil.copy(archive / "video03.mp4", archive / "caseB" / "video01.mp4")  # caseB's recording replaced
    log = io.StringIO()
    outcome = run_archive([str(archive)], ArchiveOptions(out=out, workers=2, retries=0), stream=log)
    assert sorted(outcome.skipped) == ["caseA__video01", "video03"]
    assert outcome.replayed == ["caseB__video01"] and [f["case_id"] for f in outcome.failures] == ["broken"]
    assert outcome.attempts == {"caseB__video01": 1, "broken": 1}
    for c in ("caseA__video01", "video03"):
        assert (out / c / DONE_FILE).stat().st_mtime_ns == before[c]  # not touched
    redone = json.loads((out / "caseB__video01" / DONE_FILE).read_text())
    assert redone["input"]["size"] == (archive / "video03.mp4").stat().st_size
    assert not (out / ".tmp-video03-deadbeef").exists()
    assert "4 cases, 2 already done" in log.getvalue()


def test_a_changed_model_set_or_input_is_not_done(tmp_path):
    from or_agent.agent.archive.run import DONE_FILE, input_fingerprint, is_done, model_set_fingerprint

    video = tmp_path / "v.mp4"
    video.write_bytes(b"x" * (3 << 20))
    models = model_set_fingerprint(None)
    fp = input_fingerprint(video)
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / DONE_FILE).write_text(json.dumps({"input": fp, "model_set": models}))
    assert is_done(tmp_path / "case", fp, models)
    assert not is_done(tmp_path / "case", fp, {**models, "id": "another set"})
    with open(video, "r+b") as fh:  # the tail changes, the size does not
        fh.seek(-1, 2)
        fh.write(b"y")
    assert not is_done(tmp_path / "case", input_fingerprint(video), models)
    assert model_set_fingerprint("endoscapes")["id"] != models["id"]


def _case(root, case_id, rows, alerts, fps=10.0, frames=100, oob=0, labelled=None):
    d = root / case_id
    d.mkdir(parents=True)
    (d / "DONE.json").write_text("{}")
    summary = {"video": f"/archive/{case_id}.mp4", "frames": frames, "fps": fps, "duration_s": frames / fps,
               "complete": True, "model_set": {"name": "endoscapes", "version": "1.0.0"},
               "models": {"anatomy": {"version": "1.2.0"}, "phase": {"version": "1.0.0"}},
               "out_of_body_frames": oob, "alerts": alerts}
    if labelled:
        summary["phase_metrics"] = {k: {"accuracy": acc, "per_phase": {"Preparation": {
            "precision": acc, "recall": acc, "f1": acc, "jaccard": acc, "frames": labelled}}}
            for k, acc in (("strict", 0.5), ("relaxed", 0.75))}
    (d / "summary.json").write_text(json.dumps(summary))
    full = [{"frame": int(t * fps), "time_s": t, "phase": p, "phase_id": 0, "confidence": conf, "out_of_body": 0,
             "low_visibility": low, "classifications": cls} for t, p, conf, low, cls in rows]
    (d / "timeline.json").write_text(json.dumps({"rows": full}))


def test_cohort_report_known_answers(tmp_path):
    from or_agent.agent.archive.report import write_cohort_report

    cvs_all = {"cvs_two_structures": 0.9, "cvs_hepatocystic_triangle": 0.8, "cvs_cystic_plate": 0.7}
    cvs_two = {"cvs_two_structures": 0.9, "cvs_hepatocystic_triangle": 0.2, "cvs_cystic_plate": 0.6}
    raised = {"event": "raised", "rule": "clipping_without_cvs", "severity": "warning"}
    # case one: 300 s preparation (beyond Cholec80's p90 of 238 s), all three criteria at once before clipping
    _case(tmp_path, "one", [(0, "Preparation", 0.9, 0, {}), (300, "CalotTriangleDissection", 0.4, 1, cvs_all),
                            (400, "ClippingCutting", 0.9, 0, {})], [], frames=5000, oob=100, labelled=1000)
    # case two: clipping with two criteria of three, one advisory and one cleared event
    _case(tmp_path, "two", [(0, "CalotTriangleDissection", 0.9, 0, cvs_two), (50, "ClippingCutting", 0.9, 0, {})],
          [raised, {**raised, "event": "cleared"}], frames=1000, labelled=3000)
    report = write_cohort_report(tmp_path)
    by = {c["case_id"]: c for c in report["per_case"]}
    assert by["one"]["phase_durations_s"] == {"Preparation": 300.0, "CalotTriangleDissection": 100.0, "ClippingCutting": 100.0}
    assert by["one"]["low_visibility_s"] == 100.0 and by["one"]["phase_unsure_s"] == 100.0 and by["one"]["out_of_body_s"] == 10.0
    assert report["phase_durations"]["Preparation"]["beyond_cholec80_p90"] == ["one"]
    assert report["phase_durations"]["ClippingCutting"]["cohort"] == {"cases": 2, "median_s": 75.0, "p90_s": 100.0, "max_s": 100.0}
    assert by["one"]["cvs_before_clipping"] == {"all_at_once": True, "cvs_cystic_plate": True,
                                                "cvs_hepatocystic_triangle": True, "cvs_two_structures": True}
    assert report["cvs_before_clipping"] == {"cases": 2, "reached": {
        "all_at_once": 1, "cvs_cystic_plate": 2, "cvs_hepatocystic_triangle": 1, "cvs_two_structures": 2}}
    assert report["alerts"]["by_rule"] == {"clipping_without_cvs": {"raised": 1, "cases": 1}}
    assert report["alerts"]["by_severity"] == {"critical": 0, "warning": 1, "info": 0} and report["alerts"]["per_case_mean"] == 0.5
    pm = report["phase_metrics"]
    assert pm["strict"]["accuracy"] == {"mean": 0.5, "sd": 0.0} and pm["strict"]["accuracy_pooled"] == 0.5
    assert pm["official"]["accuracy"]["mean"] == 0.75 and pm["official"]["jaccard"]["mean"] == 0.75
    assert report["model_versions"] == {"anatomy": {"1.2.0": 2}, "phase": {"1.0.0": 2}}
    assert report["paused_s"] == {"out_of_body": 10.0, "low_visibility": 100.0}


def test_command_line_errors_are_one_line(tmp_path, archive):
    proc = run_cli("archive", "run", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"or-agent: error: {tmp_path / 'nothing'}: no such video file, folder or manifest")
    proc = run_cli("archive", "run", str(archive / "video03.mp4"), "--out", str(tmp_path / "out"), "--ray", "127.0.0.1:1")
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "or-agent: error: --ray 127.0.0.1:1: no Ray cluster answers there")
    proc = run_cli("archive", "report", str(tmp_path))
    assert proc.returncode == 2 and "no completed case" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("archive", "run", str(archive), "--out", str(tmp_path / "out"), "--retries", "-1")
    assert proc.returncode == 2 and proc.stderr.strip() == "or-agent: error: --retries must be 0 or more, got -1"


def test_without_ray_the_extra_is_named(monkeypatch, tmp_path):
    from or_agent.agent.archive.run import ArchiveOptions, _start_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(DependencyError, match=r"^archive run needs Ray: pip install 'or-agent\[archive\]'$"):
        _start_ray(ArchiveOptions(out=tmp_path))
