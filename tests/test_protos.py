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


def test_the_tagger_enum_spells_the_shared_vocabulary() -> None:
    """One vocabulary (steering.vocabulary) for the tagger, the policy and the converters: the
    protobuf enum names the same tags, and the generator's converter reads them all."""
    from generator.tagger_client import EMOTION_NAMES
    from protos.steering.v1 import tagger_pb2
    from steering.vocabulary import TAGS

    names = [n.removeprefix("EMOTION_").lower() for n in tagger_pb2.Emotion.keys() if n != "EMOTION_UNSPECIFIED"]
    assert sorted(names) == sorted(TAGS)
    assert sorted(EMOTION_NAMES.values()) == sorted(TAGS)
