"""The checked-in gRPC stubs are what the codegen step makes from the .proto (README's promise)."""

from __future__ import annotations

import shutil

import or_agent.proto.generate as codegen
from tests.conftest import ROOT


def test_checked_in_stubs_are_current():
    assert codegen.main(["--check"]) == 0


def test_a_changed_proto_makes_the_check_fail(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    proto = tmp_path / "proto" / "oragent" / "v1" / "agent.proto"
    text = proto.read_text()
    assert "message StatusRequest {}" in text
    proto.write_text(text.replace("message StatusRequest {}", "message StatusRequest { bool verbose = 1; }"))
    monkeypatch.setattr(codegen, "ROOT", tmp_path)
    monkeypatch.setattr(codegen, "PROTOS", [proto])
    assert codegen.main(["--check"]) == 1
    assert "stale generated stubs (run: python -m or_agent.proto.generate): proto/oragent/v1/agent_pb2.py" in capsys.readouterr().err
