"""Generated gRPC code is reproducible from protos/ and the sync check notices drift."""

from __future__ import annotations

import shutil
from pathlib import Path

from propensity import codegen_check
from propensity.settings import PROJECT_ROOT


def test_committed_code_matches_protos() -> None:
    assert codegen_check.main() == 0


def test_a_changed_proto_generates_different_code(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROJECT_ROOT / "protos", protos)
    proto = protos / "propensity" / "v1" / "recommendation_service.proto"
    proto.write_text(proto.read_text().replace("string model_version = 5;", "string model_version = 5;\n  bool dry_run = 99;"))
    out = tmp_path / "out"
    out.mkdir()
    generated = codegen_check.generate(protos, out)
    fresh = out / "propensity" / "v1" / "recommendation_service_pb2.py"
    assert fresh in generated
    assert fresh.read_bytes() != (PROJECT_ROOT / "propensity" / "v1" / "recommendation_service_pb2.py").read_bytes()


def test_service_follows_buf_layout() -> None:
    """Directory equals package, and every RPC has its own Request/Response pair."""
    from propensity.v1 import recommendation_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["RecommendationService"]
    assert pb.DESCRIPTOR.package == "propensity.v1"
    assert pb.DESCRIPTOR.name == "propensity/v1/recommendation_service.proto"
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
