"""GGUF control vectors: the llama.cpp/repeng layout, read back by the gguf package itself."""

from pathlib import Path

import gguf
import pytest
import torch

from steering.errors import VectorError
from steering.gguf_io import export_control_vector, import_control_vector


def test_layout_is_what_llama_cpp_reads(tmp_path: Path) -> None:
    dirs = {layer: torch.randn(16) for layer in (0, 3, 4, 5)}
    path = tmp_path / "happy.gguf"
    written = export_control_vector(path, dirs, model_hint="llama", extra={"concept": "happy"})
    assert written == [3, 4, 5]  # llama.cpp cannot steer block 0
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.3", "direction.4", "direction.5"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32


def test_round_trip(tmp_path: Path) -> None:
    dirs = {layer: torch.randn(16) * layer for layer in (2, 7)}
    path = tmp_path / "v.gguf"
    export_control_vector(path, dirs, model_hint="gemma3", extra={"fingerprint": "f" * 64})
    back, hint, extra = import_control_vector(path)
    assert hint == "gemma3" and extra == {"fingerprint": "f" * 64}
    assert sorted(back) == [2, 7]
    for layer in dirs:
        assert torch.equal(back[layer], dirs[layer])


def test_reads_a_file_written_the_way_repeng_writes_it(tmp_path: Path) -> None:
    """repeng writes with GGUFWriter directly: no `steering.*` keys, layer_count, model_hint."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    for layer in (12, 13):
        writer.add_tensor(f"direction.{layer}", (torch.ones(8) * layer).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back, hint, extra = import_control_vector(path)
    assert hint == "llama" and extra == {} and sorted(back) == [12, 13]
    assert torch.equal(back[13], torch.ones(8) * 13)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VectorError, match="no such file"):
        import_control_vector(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(VectorError, match="not a readable GGUF"):
        import_control_vector(junk)
    with pytest.raises(VectorError, match="cannot hold layer 0"):
        export_control_vector(tmp_path / "x.gguf", {0: torch.ones(4)}, model_hint="llama")
    assert not (tmp_path / "x.gguf").exists()
