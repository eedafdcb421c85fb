"""Command lines for models and caches: a Hugging Face folder as --model (converted once into a cache beside it,
then reused), and the disk KV cache leaving nothing behind after Ctrl-C."""

import os
import signal
import subprocess
import sys

from test_hf_convert import QWEN2_SPLIT, byte_level_tokenizer, make_model


def dllama(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllama", *args], capture_output=True, text=True, timeout=300, **kw)


def test_hugging_face_folder_as_model_is_converted_once(tmp_path):
    folder = tmp_path / "qwen3-tiny"
    make_model(folder, "qwen3", byte_level_tokenizer(folder, QWEN2_SPLIT, bos=False))
    first = dllama("inference", "--model", str(folder), "--prompt", "hello", "--steps", "4", "--temperature", "0")
    assert first.returncode == 0, first.stderr[-1500:]
    assert "convert" in first.stderr.lower()
    second = dllama("inference", "--model", str(folder), "--prompt", "hello", "--steps", "4", "--temperature", "0")
    assert second.returncode == 0 and "convert" not in second.stderr.lower(), second.stderr[-1500:]
    assert second.stdout.split("\n\n")[0] == first.stdout.split("\n\n")[0]  # same greedy text


def test_disk_kv_cache_from_the_command_line_leaves_nothing_after_ctrl_c(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "dllama", "inference", "--prompt", "Once upon a time", "--steps",
                          "100000", "--max-seq-len", "8192", "--kv-cache-storage", "disk", "--kv-cache-dir", str(tmp_path),
                          "--buffer-float-type", "f16", "--local-workers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout.read(len("Once upon a time")) == "Once upon a time"
        maps = open(f"/proc/{p.pid}/maps").read()
        assert "dllama-kv" in maps and "(deleted)" in maps  # the cache is a mapped file without a name
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    assert os.listdir(tmp_path) == []
