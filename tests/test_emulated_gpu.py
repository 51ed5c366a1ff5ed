"""The GPU path's host-side logic, run for real against an emulated CUDA device and TensorRT runtime.

No CI machine has a GPU or TensorRT; without this, the TensorRT backend and the GPU frame path
would first execute on an OR box. tests/emulated_gpu/ (README there) stands in for ``pycuda`` and
``tensorrt`` in a subprocess: memory, copies and the two kernels' arithmetic are emulated in
numpy, the engines run with ONNX Runtime. The kernels' CUDA code and TensorRT itself are checked
on a GPU (``-m gpu``, ``-m tensorrt``, ``python -m bench.gpu_check``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, assert_qualification_consistent

EMULATION = ROOT / "tests" / "emulated_gpu"


def scenario(name: str, *args: str, tmp_path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EMULATION), str(ROOT)]),
           "OR_AGENT_ENGINE_CACHE": str(tmp_path / "default-cache"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(EMULATION / "scenarios.py"), name, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tensorrt_backend_keeps_the_phase_state_on_the_device(tmp_path):
    r = scenario("phase_state", "12", tmp_path=tmp_path)
    assert r["max_logit_diff"] < 1e-5  # same model, same numbers as ONNX Runtime
    # first step: frame and the zero state go up; later steps: only the frame (state swapped on the device)
    assert r["first_step_uploads"] == sorted([r["frame_bytes"], r["state_bytes"]])
    assert r["later_step_uploads"] == [r["frame_bytes"]]
    assert r["after_reset_uploads"] == sorted([r["frame_bytes"], r["state_bytes"]])
    # CUDA graphs (driver API): one per arrangement of the swapped state buffers, replayed every step;
    # the engine ran eagerly once (the warm-up) and otherwise only inside the 13 graph launches
    assert r["graph_status"] == "captured 2" and r["distinct_graphs"] == 2
    assert r["graph_launches"] == 12 and r["engine_executions"] == 1 + 13
    assert r["graphs_left_after_close"] == 0


def test_built_engines_and_gpu_frame_path_give_the_reference_results(held_out_video, tmp_path):
    r = scenario("build_and_pipeline", str(held_out_video / "video01.mp4"), str(tmp_path / "engines"), "200",
                 tmp_path=tmp_path)
    assert r["build_exit"] == 0 and r["rebuild_exit"] == 0
    # the doctor sees the GPU and its kernels, and the engines missing before build-engines, present after
    for lines in (r["doctor_before"], r["doctor_after"]):
        assert "ok    GPU preprocessing and reduction kernels compile (the frame path can run on the GPU)" in lines
        assert "ok    TensorRT 11.0.0.0" in lines
    assert sum(x.startswith("WARN  no TensorRT engine for ") for x in r["doctor_before"]) == 3
    assert sum(x.startswith("ok    engine for ") for x in r["doctor_after"]) == 3
    assert len(r["built"]) == 3  # three models built by the first run; the second found them cached
    assert r["backends"] == {"segmentation": "tensorrt", "phase": "tensorrt", "visibility": "tensorrt"}
    assert all(why.startswith("tensorrt: engine ") and "Emulated GPU (sm 9.0, 132 SMs, TensorRT 11.0)" in why
               for why in r["reasons"].values())
    assert r["frame_path"] == "gpu: pycuda kernels feed the TensorRT engines on the device"
    assert r["graph_status"] == {"segmentation": "captured 1", "phase": "captured 2", "visibility": "captured 1"}
    assert r["frames"] == [200, 200] and r["seq_equal"]
    # every in-body frame's anatomy ran in the engine (graph replays, after one eager warm-up run) and
    # was reduced on the device
    assert r["anatomy_runs"] == r["anatomy_fresh"] + 1 and r["anatomy_fresh"] > 150
    assert r["class_maps_equal"] >= 0.99 and r["area_fraction_diff"] < 1e-3
    # (a mean within 1e-5 of half a grey level may round the other way in the emulated kernel: one level
    # on a few input values, which moves a probability by less than 1e-2 and decides nothing)
    assert r["phase_equal"] == 1.0 and r["phase_prob_diff"] < 1e-2 and r["visibility_equal"] == 1.0
    assert r["buffers_in_use_after"] == 0 and 3 <= r["pool_slots"] <= 48
    assert r["allocations_left_after_close"] == 0 < r["allocations_while_loaded"]


def test_qualify_passes_the_emulated_box_on_tensorrt_gpu_preprocessing_and_cuda_graphs(small_dataset, tmp_path):
    r = scenario("qualify", str(small_dataset / "video01.mp4"), str(tmp_path / "engines"), str(tmp_path / "q"),
                 tmp_path=tmp_path)
    report = r["report"]
    assert_qualification_consistent(report, r["exit"])
    assert report["box"]["gpu"] == "Emulated GPU (sm 9.0, 132 SMs)" and report["box"]["tensorrt"] == "11.0.0.0"
    assert report["box"]["preprocessing"] == "gpu: pycuda kernels feed the TensorRT engines on the device"
    assert {m["backend"] for m in report["box"]["models"].values()} == {"tensorrt"}
    assert report["box"]["models"]["phase"]["cuda_graph"] == "captured 2"
    # the deployed path computes what the CPU path does
    assert report["agreement"]["anatomy_miou"] > 0.999 and report["agreement"]["phase_agreement"] == 1.0
    assert report["agreement"]["frames"] == 20 and report["agreement"]["frames_missing"] == 0


def test_a_live_agent_builds_missing_engines_only_when_configured(tmp_path):
    r = scenario("live_build", str(tmp_path / "engines"), tmp_path=tmp_path)
    assert r["refused"].startswith("no TensorRT engine for anatomy on Emulated GPU (TensorRT 11.0); building one takes "
                                   "minutes and is refused during a live case")
    assert r["built"] == 3 and r["backends"] == ["tensorrt"]
    assert all(why.startswith("tensorrt: building engine ") for why in r["reasons"].values())
    assert r["cached"] == [".cache", ".engine", ".engine", ".engine", ".json", ".json", ".json"]  # + timing cache
