"""The checked-in stubs are exactly what grpcio-tools generates from the protos."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "protos" / "steering" / "v1").glob("*.proto"))


def test_stubs_are_up_to_date(tmp_path: Path) -> None:
    assert [p.name for p in PROTOS] == ["generator.proto", "tagger.proto"]
    rel = [str(p.relative_to(ROOT)) for p in PROTOS]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", *rel],
        cwd=ROOT, check=True,
    )
    generated = sorted((tmp_path / "protos" / "steering" / "v1").glob("*.py*"))
    assert len(generated) == 6
    for new in generated:
        checked_in = ROOT / "protos" / "steering" / "v1" / new.name
        assert checked_in.read_text() == new.read_text(), f"{checked_in.name} is stale: regenerate the stubs (see README)"


def test_zero_enum_values_are_unspecified() -> None:
    from protos.steering.v1 import generator_pb2, tagger_pb2

    for module in (generator_pb2, tagger_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
