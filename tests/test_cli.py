"""`dllama` front-end behaviour with real processes: the happy path and every kind of bad input, each of
which must give one clear line on stderr and a non-zero exit, never a traceback."""

import os
import subprocess
import sys

import pytest
from gguf import GGUFWriter

from dllama.model.default import default_model_path

MODEL = default_model_path()


def dllama(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "dllama", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_inference_default_model_greedy():
    r = dllama("inference", "--prompt", "The capital of France is", "--steps", "3", "--temperature", "0",
               "--nthreads", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris.")
    assert "generation:" in r.stdout and "tokens/s" in r.stdout
    assert "prompt:" in r.stdout


def test_inference_sampling_is_reproducible_with_seed():
    args = ("inference", "--prompt", "Once upon a time", "--steps", "12", "--temperature", "1.0", "--seed", "7",
            "--nthreads", "1")  # fmt: skip
    a, b = dllama(*args), dllama(*args)
    assert a.returncode == 0 and b.returncode == 0
    assert a.stdout.split("\n\nprompt:")[0] == b.stdout.split("\n\nprompt:")[0]


def test_missing_model_file(tmp_path):
    assert_one_line_error(
        dllama("inference", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"), "not found"
    )


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello, I am not a model" * 10)
    assert_one_line_error(dllama("inference", "--model", str(p), "--prompt", "hi"), "not a GGUF")


def test_truncated_gguf(tmp_path):
    p = tmp_path / "half.gguf"
    with open(MODEL, "rb") as f:
        p.write_bytes(f.read(os.path.getsize(MODEL) // 2))
    assert_one_line_error(dllama("inference", "--model", str(p), "--prompt", "hi"), "truncated")


def test_unsupported_architecture(tmp_path):
    p = str(tmp_path / "falcon.gguf")
    w = GGUFWriter(p, "falcon")
    w.add_block_count(1)
    import numpy as np

    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(
        dllama("inference", "--model", p, "--prompt", "hi"), "unsupported model architecture", "falcon"
    )


def test_prompt_longer_than_context():
    r = dllama("inference", "--prompt", "word " * 50, "--max-seq-len", "16", "--steps", "2")
    assert_one_line_error(r, "context")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "many"], "--steps"),
        (["--temperature", "-1"], "--temperature"),
        (["--topp", "1.5"], "--topp"),
        (["--nthreads", "0"], "--nthreads"),
        (["--max-seq-len", "-3"], "--max-seq-len"),
        (["--workers", "nohostport"], "--workers"),
        (["--buffer-float-type", "f64"], "--buffer-float-type"),
        (["--bogus-flag"], "unrecognized"),
    ],
)
def test_bad_flag_values(flags, needle):
    r = dllama("inference", "--prompt", "hi", *flags)
    assert r.returncode == 2
    assert_one_line_error(r, needle)


def test_missing_required_prompt():
    assert_one_line_error(dllama("inference"), "--prompt")


def test_convert_rejects_unknown_type_and_same_file():
    assert_one_line_error(dllama("convert", MODEL, "/tmp/x.gguf", "--type", "q2k"), "--type")
    assert_one_line_error(dllama("convert", MODEL, MODEL, "--type", "q80"), "differ")


def test_convert_roundtrip_q80_keeps_answer(tmp_path):
    out = str(tmp_path / "smol-q80.gguf")
    r = dllama("convert", MODEL, out, "--type", "q80")
    assert r.returncode == 0, r.stderr
    r = dllama("inference", "--model", out, "--prompt", "The capital of France is", "--steps", "2",
               "--temperature", "0", "--nthreads", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris")


def test_runs_without_torch(tmp_path):
    """torch is only the tests' reference, not a dependency: a user without it must be able to run (the cold
    tokenizer conversion included, which once went through transformers' torch-importing GGUF reader)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from dllama.cli.main import main\n"
        "sys.exit(main(['inference', '--prompt', 'The capital of France is', '--steps', '2', "
        "'--temperature', '0', '--nthreads', '1']))"
    )
    env = dict(os.environ, DLLAMA_CACHE_DIR=str(tmp_path))  # cold cache: the conversion really runs
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris")
