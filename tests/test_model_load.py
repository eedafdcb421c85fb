"""Loading models: non-native GGUF types converted at load (one note line, quality kept), and the KV-cache
length capped to the memory the machine has."""

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from gguf.quants import quantize

from dllama.model.convert import _copy_metadata, convert
from dllama.model.gguf_model import GGUFModel
from dllama.runtime import memory
from dllama.runtime.root import Root

QUIET = {"log": lambda *a: None}
CONVERTED = {"attn_q": QT.Q5_0, "ffn_up": QT.Q5_1, "ffn_down": QT.BF16}


def rewrite_with_types(src: str, dst: str) -> None:
    """Copy of `src` (F32 matrices) with some matrices stored in types dllama does not compute natively."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    _copy_metadata(r, w)
    for t in r.tensors:
        f = np.asarray(t.data, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        qtype = CONVERTED.get(kind)
        if qtype is None:
            w.add_tensor(t.name, f)
        else:
            w.add_tensor(t.name, quantize(f, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_non_native_types_are_converted_at_load_keeping_quality(tiny8, tmp_path):
    path = str(tmp_path / "mixed.gguf")
    rewrite_with_types(tiny8["f32"], path)
    m = GGUFModel(path, verbose=False)
    n_layers = m.config.n_layers
    assert m.converted == {"Q5_0->Q8_0": n_layers, "Q5_1->Q8_0": n_layers, "BF16->Q8_0": n_layers}
    assert m.layer(0, "attn_q").type == QT.Q8_0 and m.layer(0, "ffn_down").type == QT.Q8_0
    ids = [5, 300, 17, 256, 99]

    def logits(model):
        return Root(model, nthreads=1, max_seq=16, **QUIET).forward(ids, 0).copy()

    exact, q80 = str(tmp_path / "exact.gguf"), str(tmp_path / "q80.gguf")
    convert(path, exact, "f32")  # what the mixed file means, dequantized by gguf-py
    convert(exact, q80, "q80")
    ref = logits(GGUFModel(exact))
    baseline = np.corrcoef(logits(GGUFModel(q80)), ref)[0, 1]  # a whole-Q8_0 copy's distance from it
    got = np.corrcoef(logits(m), ref)[0, 1]
    print(
        f"correlation with the file's exact values: converted at load {got:.5f}, all-Q8_0 copy {baseline:.5f}"
    )
    assert got >= baseline - 1e-3  # converting 5-bit / bf16 weights to Q8_0 loses no more than Q8_0 itself
    # the user is told in one line
    r = subprocess.run([sys.executable, "-m", "dllama", "inference", "--model", path, "--prompt", "ab", "--steps", "2",
                        "--nthreads", "1"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "converted at load" in ln]
    assert len(notes) == 1 and "Q5_0->Q8_0" in notes[0] and "BF16->Q8_0" in notes[0], r.stderr


# (cache type, bytes per cached value, pretended free MiB): the full 8192-position cache needs 377 MB in f32,
# 189 MB in f16 (the default), more than fits beside the model's ~225 MB in these budgets
@pytest.mark.parametrize("kv_type,nbytes,free_mib", [(None, 2, 384), ("f32", 4, 512)], ids=["default-f16", "f32"])
def test_kv_cache_capped_to_available_memory(monkeypatch, default_model, kv_type, nbytes, free_mib):
    monkeypatch.setattr(memory, "available_bytes", lambda: free_mib << 20)  # pretend so much is free
    notes = []
    kw = {"kv_type": kv_type} if kv_type else {}
    r = Root(GGUFModel(default_model), nthreads=1, log=notes.append, **kw)  # the model's context: 8192 positions
    per_pos = 2 * r.cfg.n_layers * r.cfg.kv_dim * nbytes
    assert r.max_seq < r.cfg.context_length
    assert r.max_seq * per_pos <= 0.6 * (free_mib << 20)
    assert any("capped" in n for n in notes), notes
