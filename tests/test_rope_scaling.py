"""Llama 3.1 `rope_freqs` (per-pair frequency divisors) and linear rope scaling, on synthetic models carrying those
keys, against the NumPy reference (`dllama.testing.reference.forward` reads the keys with gguf-py and computes rope
on its own). A model without the keys is checked to give different logits, so the keys are really used."""

import gguf
import numpy as np
import pytest

from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root
from dllama.testing import reference as ref
from dllama.testing.synthetic import write_synthetic_gguf

QUIET = {"log": lambda *a: None}
IDS = [5, 300, 17, 256, 99, 100, 42, 7, 8, 9, 400, 33]


def with_extra(src: str, dst: str, kv: dict, tensors: dict[str, np.ndarray]) -> str:
    """Copy of the GGUF `src` with extra metadata (key -> (value, GGUFValueType)) and extra f32 tensors."""
    r = gguf.GGUFReader(src)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            vals = [f.parts[i] for i in f.data]
            vals = [str(bytes(v), "utf-8") if sub == gguf.GGUFValueType.STRING else v.tolist()[0] for v in vals]
            w.add_array(name, vals)
        elif t == gguf.GGUFValueType.STRING:
            w.add_string(name, str(bytes(f.parts[-1]), "utf-8"))
        else:
            w.add_key_value(name, f.parts[-1].tolist()[0], t)
    for name, (value, vtype) in kv.items():
        w.add_key_value(name, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                     raw_dtype=t.tensor_type)  # fmt: skip
    for name, arr in tensors.items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("rope")
    return write_synthetic_gguf(str(d / "base.gguf"), dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=32, vocab_size=512, weight_type="f32", seed=5)  # fmt: skip


def check(path: str, base_path: str) -> None:
    m = GGUFModel(path)
    expect = ref.forward(path, IDS)
    got = np.array([Root(m, nthreads=1, max_seq=32, kv_type="f32", **QUIET).forward(IDS[: i + 1], 0).copy() for i in range(len(IDS))])
    plain = ref.forward(base_path, IDS)
    print(f"max |diff| vs reference {np.abs(got - expect).max():.2e}; effect of the keys "
          f"{np.abs(expect - plain).max():.3f}")  # fmt: skip
    assert np.abs(expect - plain).max() > 1e-2, "the keys did not change the reference: the test checks nothing"
    np.testing.assert_allclose(got, expect, atol=2e-4, rtol=0)


def test_llama31_rope_freqs(base, tmp_path):
    factors = np.linspace(1.0, 8.0, 16)  # head_dim / 2 divisors, like Llama 3.1's low..high frequency bands
    path = with_extra(base, str(tmp_path / "freqs.gguf"), {}, {"rope_freqs.weight": factors})
    assert GGUFModel(path).config.rope_freq_factors is not None
    check(path, base)


def test_linear_rope_scaling(base, tmp_path):
    kv = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
          "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}  # fmt: skip
    path = with_extra(base, str(tmp_path / "linear.gguf"), kv, {})
    assert GGUFModel(path).config.rope_linear_scale == 4.0
    check(path, base)
