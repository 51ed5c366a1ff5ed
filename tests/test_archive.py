"""``or-agent archive``: cases listed with unique ids, replayed on a local Ray (one failing video reported,
the rest done), a rerun that skips what is done and redoes what changed, and the cohort report's figures
against the per-case outputs and against hand-made cases with known answers."""

import csv
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from or_agent.pipelines.errors import DependencyError, InputError
from tests.conftest import ROOT, run_cli


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
        assert by_case[case]["official_accuracy"] == s["phase_metrics"]["official"]["accuracy"]
        assert sum(by_case[case]["phase_durations_s"].values()) == pytest.approx(s["duration_s"], abs=0.01)
    for name in ("strict", "official"):
        frames, correct = map(sum, zip(*(_frames_and_correct(s, name) for s in summaries.values())))
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
    from or_agent.agent.archive.run import DONE_FILE, case_files, input_fingerprint, is_done, model_set_fingerprint

    video = tmp_path / "v.mp4"
    video.write_bytes(b"x" * (3 << 20))
    models = model_set_fingerprint(None)
    fp = input_fingerprint(video)
    case = tmp_path / "case"
    (case / "sub").mkdir(parents=True)
    (case / "summary.json").write_text('{"frames": 10}')
    (case / "sub" / "map.png").write_bytes(b"p" * 100)
    assert case_files(case) == {"sub/map.png": 100, "summary.json": 14}
    (case / DONE_FILE).write_text(json.dumps({"input": fp, "model_set": models, "files": case_files(case)}))
    assert is_done(case, fp, models)
    assert not is_done(case, fp, {**models, "id": "another set"})
    # a file it listed missing or of another size (a folder half-deleted or half-copied): not done
    (case / "sub" / "map.png").write_bytes(b"p" * 99)
    assert not is_done(case, fp, models)
    (case / "sub" / "map.png").unlink()
    assert not is_done(case, fp, models)
    (case / DONE_FILE).write_text(json.dumps({"input": fp, "model_set": models}))  # no file list: not a record of ours
    assert not is_done(case, fp, models)
    (case / "sub" / "map.png").write_bytes(b"p" * 100)
    (case / DONE_FILE).write_text(json.dumps({"input": fp, "model_set": models, "files": case_files(case)}))
    assert is_done(case, fp, models)
    with open(video, "r+b") as fh:  # the tail changes, the size does not
        fh.seek(-1, 2)
        fh.write(b"y")
    assert not is_done(tmp_path / "case", input_fingerprint(video), models)
    assert model_set_fingerprint("endoscapes")["id"] != models["id"]


def _case(root, case_id, rows, alerts, fps=10.0, frames=100, oob=0, labelled=None, unfamiliar_s=None):
    d = root / case_id
    d.mkdir(parents=True)
    (d / "DONE.json").write_text("{}")
    summary = {"video": f"/archive/{case_id}.mp4", "frames": frames, "fps": fps, "duration_s": frames / fps,
               "complete": True, "model_set": {"name": "endoscapes", "version": "1.0.0"},
               "models": {"anatomy": {"version": "1.2.0"}, "phase": {"version": "1.0.0"}},
               "out_of_body_frames": oob, "alerts": alerts}
    if unfamiliar_s is not None:  # replays before the familiarity check wrote no paused_s
        summary["paused_s"] = {"camera out of body": oob / fps, "unfamiliar scene": unfamiliar_s}
    if labelled:
        summary["phase_metrics"] = {k: {"accuracy": acc, "per_phase": {"Preparation": {
            "precision": acc, "recall": acc, "f1": acc, "jaccard": acc, "frames": labelled}}}
            for k, acc in (("strict", 0.5), ("official", 0.75))}
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
                            (400, "ClippingCutting", 0.9, 0, {})], [], frames=5000, oob=100, labelled=1000,
          unfamiliar_s=12.5)
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
    assert report["paused_s"] == {"out_of_body": 10.0, "unfamiliar_scene": 12.5, "low_visibility": 100.0}
    assert by["one"]["unfamiliar_scene_s"] == 12.5 and by["two"]["unfamiliar_scene_s"] == 0.0


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


# ----- a driver killed mid-run loses nothing completed ------------------------------------------


def _ray_processes(session_root, only: str = "") -> dict[int, str]:
    """The live processes (pid: command line) of the Ray a driver started with ``RAY_TMPDIR=session_root``:
    every one of them (head, raylet, agents, workers) inherits the driver's environment, while the workers
    rename themselves (``ray::ReplayWorker``), so their command line does not say. ``only``: those whose
    command line has it. Read from /proc (Linux, as Ray's local mode here)."""
    marker = f"RAY_TMPDIR={session_root}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                if only in command:
                    found[int(proc.name)] = command
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_ended(processes: dict[int, str], timeout_s: float) -> list[str]:
    """Waits up to ``timeout_s`` for ``processes`` (pid: command line) to end; kills (by pid) and names any left."""
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [f"{pid} {command[:160]}" for pid, command in processes.items() if _alive(pid)]
    for pid in processes:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    return left


def _driver(args, session_root, log):
    """``or-agent archive run ARGS --ray local`` as a user starts it, with its own Ray session folder."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(session_root)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "or_agent.agent.cli", "archive", "run", *args, "--ray", "local"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _case_folders(out):
    return {d.name for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")}


def test_a_killed_driver_loses_nothing_completed_and_a_rerun_does_the_rest(tmp_path):
    """The driver is killed (SIGKILL, as a crash) once a case is done and while others are not: every case
    folder left is complete and valid, half-written ones are not taken for done, and a rerun (its own Ray)
    replays exactly the rest, skipping the completed ones untouched."""
    pytest.importorskip("ray", reason="archive run needs Ray: pip install -e '.[archive]'")
    if not Path("/proc/self/environ").is_file():
        pytest.skip("finds the driver's Ray processes in /proc (Linux)")
    from or_agent.agent.archive.run import DONE_FILE, input_fingerprint, is_done, model_set_fingerprint
    from or_agent.agent.archive.sources import list_cases
    from or_agent.synth.dataset import SynthConfig, write_dataset

    archive = tmp_path / "archive"
    # one short surgery first, then two longer ones: with one worker the cases go in this order, so when the
    # first is done the second is still being replayed (or queued) whatever the machine's speed
    for name, time_scale, seed in (("a_short", 800.0, 7), ("b_long", 150.0, 8), ("c_long", 150.0, 9)):
        write_dataset(tmp_path / name, SynthConfig(videos=1, seed=seed, time_scale=time_scale, width=160, height=128,
                                                   mask_every=1000))
        (archive / name).mkdir(parents=True)
        for suffix in (".mp4", ".json"):
            shutil.copy(tmp_path / name / f"video01{suffix}", archive / name / f"video01{suffix}")
    cases = {c.case_id: c for c in list_cases([str(archive)])}
    assert list(cases) == ["a_short__video01", "b_long__video01", "c_long__video01"]
    models = model_set_fingerprint(None)
    out = tmp_path / "out"
    args = [str(archive), "--out", str(out), "--workers", "1", "--retries", "0"]
    # short: Ray's socket paths must fit in 107 characters
    first_ray, second_ray = (Path(tempfile.mkdtemp(prefix="ork-", dir="/tmp")) for _ in range(2))
    log, relog = tmp_path / "driver.log", tmp_path / "rerun.log"
    driver = _driver(args, first_ray, log)
    try:
        deadline = time.monotonic() + 600
        while not any((out / c / DONE_FILE).is_file() for c in cases):
            assert driver.poll() is None, f"the driver ended ({driver.returncode}) before any case was done:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no case done 600 s after the start:\n{log.read_text()}"
            time.sleep(0.05)
        assert _ray_processes(first_ray, "ReplayWorker"), "the driver's Ray worker is not to be seen"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        # its Ray goes with it: the worker at once (the raylet dies with the driver); what cannot write a case
        # (Ray's dashboard and runtime-env agents) may linger about a minute and must not stop the rerun
        left = _wait_ended(_ray_processes(first_ray, "ReplayWorker"), 120)
        assert not left, "the killed driver's Ray worker was still running 120 s later:\n" + "\n".join(left)
        lingering = _ray_processes(first_ray)

        # what the kill left: complete, valid case folders only; temporary folders are not cases
        done = _case_folders(out)
        assert done and done < set(cases), (f"the kill should leave some cases done and some not, left {sorted(done)}; "
                                            f"driver output:\n{log.read_text()}")
        for c in done:
            record = json.loads((out / c / DONE_FILE).read_text())
            assert is_done(out / c, input_fingerprint(cases[c].video), models), record
            summary = json.loads((out / c / "summary.json").read_text())
            assert record["frames"] == summary["frames"] > 0 and summary["complete"]
            for name in ("timeline.csv", "timeline.json", "alerts.csv", "report.html", "annotated.mp4", "phase_ribbon.png"):
                assert record["files"][name] == (out / c / name).stat().st_size > 0, f"{c}/{name}"
        before = {c: ((out / c).stat().st_ino, (out / c / DONE_FILE).stat().st_mtime_ns, (out / c / DONE_FILE).read_bytes())
                  for c in done}
        # what else a kill (or a copy cut short) can leave, planted for the cases not done: a folder whose
        # DONE.json matches but whose summary.json is cut short, and a finished temporary folder not yet renamed
        todo = sorted(set(cases) - done)
        half = out / todo[0]
        half.mkdir(exist_ok=True)
        (half / DONE_FILE).write_text(json.dumps({"case_id": todo[0], "input": input_fingerprint(cases[todo[0]].video),
                                                  "model_set": models, "files": {"summary.json": 4000}}))
        (half / "summary.json").write_text('{"frames": 1')
        tmp_done = out / f".tmp-{todo[-1]}-0badcafe" / "video01"
        tmp_done.mkdir(parents=True)
        (tmp_done / "summary.json").write_text('{"frames": 1}')
        (tmp_done / DONE_FILE).write_text(json.dumps({"case_id": todo[-1], "input": input_fingerprint(cases[todo[-1]].video),
                                                      "model_set": models, "files": {"summary.json": 13}}))

        rerun = _driver(args, second_ray, relog)  # at once, while the killed Ray's agents may still be there
        try:
            rerun.wait(timeout=600)
        except subprocess.TimeoutExpired:
            rerun.kill()
            pytest.fail(f"the rerun did not end within 600 s:\n{relog.read_text()}")
        text = relog.read_text()
        assert rerun.returncode == 0, text
        assert list((second_ray / "ray").glob("session_*")), f"the rerun did not start its own Ray:\n{text}"
        # how long Ray's own agents take to notice a dead head is Ray's timing, not ours: not asserted
        _wait_ended(lingering, 180)
        _wait_ended(_ray_processes(second_ray), 60)
    finally:
        for d in (first_ray, second_ray):
            _wait_ended(_ray_processes(d), 0)
            shutil.rmtree(d, ignore_errors=True)
        if driver.poll() is None:
            driver.kill()

    # the skip: announced, no "ok" line for them, and their folders and records untouched (same inode, same bytes)
    assert f"archive: 3 cases, {len(done)} already done with model set synthetic " in text and f", {len(todo)} to replay" in text
    assert sorted(line.split()[1].rstrip(":") for line in text.splitlines() if line.startswith("ok ")) == todo
    assert f"{len(todo)} of {len(todo)} cases replayed, {len(done)} skipped as already done\n" in text
    for c, (inode, mtime, content) in before.items():
        assert ((out / c).stat().st_ino, (out / c / DONE_FILE).stat().st_mtime_ns, (out / c / DONE_FILE).read_bytes()) == (
            inode, mtime, content)
    # and every case done, the planted half-written folder replaced, nothing temporary left
    assert _case_folders(out) == set(cases) and all(is_done(out / c, input_fingerprint(cases[c].video), models) for c in cases)
    assert json.loads((out / todo[0] / "summary.json").read_text())["frames"] > 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*cases, "failures.json"])
