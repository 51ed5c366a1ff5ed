"""What StartCase may open (agent/source_policy.py, issue 13 item 8), without a server: the matching
rules and how a source is named outside the agent. The gRPC side is in tests/test_service.py."""

from __future__ import annotations

import pytest

from or_agent.agent.config import load_config
from or_agent.agent.source_policy import NOT_ALLOWED, STREAM_SCHEMES, SourceNotAllowed, SourcePolicy, public_name
from or_agent.pipelines import sources
from or_agent.pipelines.errors import InputError


def refused(policy: SourcePolicy, spec: str) -> bool:
    try:
        policy.admit(spec)
    except SourceNotAllowed as exc:
        assert str(exc) == NOT_ALLOWED
        return True
    return False


def test_stream_schemes_are_the_sources():
    assert STREAM_SCHEMES == sources.STREAM_SCHEMES


def test_directories_files_and_links(tmp_path):
    cases, other = tmp_path / "cases", tmp_path / "other"
    (cases / "sub").mkdir(parents=True)
    other.mkdir()
    (cases / "a.mp4").write_bytes(b"")
    (other / "b.mp4").write_bytes(b"")
    (cases / "out").symlink_to(other)
    (other / "in.mp4").symlink_to(cases / "a.mp4")
    policy = SourcePolicy([str(cases), str(other / "b.mp4")])
    assert policy.admit(str(cases / "a.mp4")) == str(cases / "a.mp4")
    assert policy.admit(str(cases / "sub")) == str(cases / "sub")
    assert policy.admit(str(other / "b.mp4")) == str(other / "b.mp4")  # a single file
    assert policy.admit(str(other / "in.mp4")) == str(cases / "a.mp4")  # a link into the area: what it points at
    for spec in (str(cases / "out" / "c.mp4"), str(cases / ".." / "other"), str(other), str(tmp_path / "cases-2"),
                 str(cases) + "-x/a.mp4", "a.mp4", "/", "nul\x00byte"):
        assert refused(policy, spec), spec
    assert policy.admit("") == ""  # the case's own check names an empty source


def test_capture_devices_and_the_launch_source(tmp_path):
    launch = tmp_path / "launch.mp4"
    policy = SourcePolicy([], str(launch))
    assert policy.admit("0") == "0" and policy.admit("/dev/video2") == "/dev/video2"
    assert policy.admit(str(launch)) == str(launch)
    for spec in (str(tmp_path / "other.mp4"), "/dev/null", "/dev/sda", "/dev/v4l/../../etc/passwd", "/dev/video0x"):
        assert refused(policy, spec), spec
    url_launch = SourcePolicy([], "rtsp://user:pw@tower/live")
    assert url_launch.admit("rtsp://user:pw@tower/live") == "rtsp://user:pw@tower/live"
    assert refused(url_launch, "rtsp://user:pw@tower/live2")


def test_url_prefixes():
    policy = SourcePolicy(["rtsp://Tower.OR3:8554/live/", "http://cam/feed", "https://cam/one?stream=2"])
    for ok in ("rtsp://tower.or3:8554/live/main", "rtsp://user:pw@tower.or3:8554/live/main?x=1",
               "http://cam/feed", "http://cam/feed/hd", "https://cam/one?stream=2"):
        assert policy.admit(ok) == ok
    for bad in ("rtsp://tower.or3/live/main",            # another port
                "rtsps://tower.or3:8554/live/main",      # another scheme
                "rtsp://tower.or3:8554/liveX",           # not at a '/'
                "rtsp://tower.or3:8554/live/../admin", "rtsp://tower.or3:8554/live/%2E%2E/admin",
                "http://cam/feedback", "http://cam.evil/feed", "http://cam@evil/feed",
                "https://cam/one?stream=3", "file:///etc/passwd", "gopher://cam/feed", "http://[::1/feed"):
        assert refused(policy, bad), bad


def test_public_names():
    assert public_name("/srv/cases/Doe_John/2026-11-28.mp4") == "2026-11-28.mp4"
    assert public_name("/srv/cases/frames/") == "frames"
    assert public_name("rtsp://user:secret@tower:8554/live/main?token=abc") == "rtsp://tower:8554/live/main"
    assert public_name("0") == "0" and public_name("/dev/video0") == "/dev/video0"


@pytest.mark.parametrize("entry, problem", [
    ("cases", "'cases' is not an absolute path, a camera index or a stream URL prefix"),
    ("ftp://host/x", "'ftp://host/x' is not a stream URL prefix"),
    ("rtsp://user:pw@/x", "'rtsp:///x' is not a stream URL prefix"),
    ("", "must be a non-empty string, got ''"),
])
def test_bad_entries_are_refused_naming_the_key(tmp_path, entry, problem):
    path = tmp_path / "agent.toml"
    path.write_text(f'[case]\nallowed_sources = ["{entry}"]\n')
    with pytest.raises(InputError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: case.allowed_sources: {problem}")
    path.write_text('[case]\nallowed_sources = "/srv/cases"\n')
    with pytest.raises(InputError, match="case.allowed_sources: must be an array, got '/srv/cases'"):
        load_config(path)
