"""The frame schedule: which models run on a frame, on media time."""

import pytest

from or_agent.pipelines.schedule import Cadence, FrameSchedule


def _run(schedule, times):
    got = {n: [] for n in schedule.cadences}
    for t in times:
        for n in schedule.due(t):
            got[n].append(t)
    return got


def test_cadences_step_on_media_time_at_the_source_rate():
    s = FrameSchedule({"seg": Cadence(), "phase": Cadence(hz=5), "every3": Cadence(every_frames=3)}, nominal_fps=25)
    got = _run(s, [f * 40.0 for f in range(26)])
    assert got["seg"] == [f * 40.0 for f in range(26)]
    assert got["phase"] == [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
    assert got["every3"] == [f * 40.0 for f in range(0, 26, 3)]


def test_dropped_frames_skip_sequence_numbers_but_do_not_starve_a_model():
    # a live source that keeps only every second frame: "every 2nd sequence number" would never run
    # a model on frames 1, 3, 5 ...; on media time it runs every 2 frame periods, whatever arrives
    s = FrameSchedule({"every2": Cadence(every_frames=2), "phase": Cadence(hz=5)}, nominal_fps=25)
    times = [f * 40.0 for f in range(1, 50, 2)]  # 40, 120, 200, ... ms
    got = _run(s, times)
    assert got["every2"] == times  # every arriving frame is at least two periods after the last run
    # 5 Hz on the grid of the first step: the first arriving frame at or after each 200 ms beat
    assert got["phase"] == [min(t for t in times if t >= 40.0 + 200.0 * k) for k in range(10)]


def test_after_a_gap_a_model_runs_once_then_keeps_its_rate():
    s = FrameSchedule({"phase": Cadence(hz=5)}, nominal_fps=25)
    got = _run(s, [0.0, 40.0, 80.0, 2000.0, 2040.0, 2080.0, 2120.0, 2160.0, 2200.0])
    assert got["phase"] == [0.0, 2000.0, 2200.0]  # no burst of catch-up steps


def test_a_timestamp_rounded_below_its_frame_still_counts_as_that_frame():
    s = FrameSchedule({"every5": Cadence(every_frames=5), "phase": Cadence(hz=5)}, nominal_fps=25)
    got = _run(s, [0.0, 40.0, 80.0, 120.0, 160.0, 199.96, 240.0, 280.0, 320.0, 360.0, 399.97, 440.0])
    assert got["every5"] == [0.0, 199.96, 399.97]  # frames 0, 5 and 10
    assert got["phase"] == [0.0, 240.0, 440.0]  # a rate steps on the first frame at or after its beat


def test_without_a_nominal_rate_the_frame_period_is_measured():
    s = FrameSchedule({"every5": Cadence(every_frames=5)}, nominal_fps=None)
    got = _run(s, [f * 100.0 for f in range(21)])  # a 10 fps live source
    assert got["every5"] == [0.0, 500.0, 1000.0, 1500.0, 2000.0]


def test_media_time_going_back_is_an_error_and_reset_starts_over():
    s = FrameSchedule({"phase": Cadence(hz=5)}, nominal_fps=25)
    s.due(400.0)
    with pytest.raises(ValueError, match="media time went back from 400.0 to 0.0 ms"):
        s.due(0.0)
    s.reset()
    assert s.due(0.0) == {"phase"}


@pytest.mark.parametrize("text, cadence", [("every frame", Cadence()), ("every 3 frames", Cadence(every_frames=3)),
                                           ("5 Hz", Cadence(hz=5.0)), ("0.5 Hz", Cadence(hz=0.5))])
def test_cadence_text_round_trips(text, cadence):
    assert Cadence.parse(text) == cadence and str(cadence) == text


@pytest.mark.parametrize("text", ["often", "every 0 frames", "0 Hz", "5hz", "every -1 frames"])
def test_bad_cadences_are_refused(text):
    with pytest.raises(ValueError):
        Cadence.parse(text)


def _media_times(video) -> list[float]:
    from or_agent.pipelines.sources import VideoFileSource

    src = VideoFileSource(video)
    src.start()
    try:
        times = []
        while (frame := src.read(timeout_s=5.0)) is not None or not src.ended:
            if frame is not None:
                times.append(frame.media_ms)
        return times
    finally:
        src.stop()


@pytest.fixture(scope="module")
def held_out_times(held_out_video) -> list[float]:
    return _media_times(held_out_video / "video01.mp4")


@pytest.mark.parametrize("anatomy_every", [1, 2, 5])
def test_the_schedule_steps_on_the_frames_the_pipeline_stepped_on_before_it(held_out_times, anatomy_every):
    """Replay's outputs stay identical: on a file's own timestamps the schedule picks the frames the
    runtime's former loop picked (phase: first frame at or after each 5 Hz beat; anatomy: every k-th)."""
    times = held_out_times
    assert len(times) > 2000
    before_phase, next_ms, step = [], 0.0, 200.0
    for t in times:
        if t >= next_ms:
            before_phase.append(t)
            next_ms = max(next_ms + step, t - step / 2)
    before_anatomy = [t for seq, t in enumerate(times) if seq % anatomy_every == 0]
    s = FrameSchedule({"phase": Cadence(hz=5.0), "anatomy": Cadence(every_frames=anatomy_every)}, nominal_fps=25.0)
    got = _run(s, times)
    assert got["phase"] == before_phase and got["anatomy"] == before_anatomy
