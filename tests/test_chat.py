"""`dllama chat` driven through a pseudo-terminal, as a person would use it."""

import re
import sys

import pexpect
import pytest

STATS = re.compile(
    r"\((\d+) new prompt tokens, (\d+) reused; (\d+) tokens at ([\d.]+) tokens/s\)([^\r\n\x1b]*)"
)
PROMPT = ">>> "


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dllama", "chat", "--nthreads", "1", "--temperature", "0", *args],
        encoding="utf-8",
        timeout=90,
        dimensions=(50, 250),
    )
    child.expect_exact("Ctrl-D or /exit quits")
    child.expect_exact(PROMPT)
    return child


def turn(child: pexpect.spawn, text: str) -> tuple[str, dict]:
    """Sends one message; returns the answer and its stats line."""
    child.sendline(text)
    child.expect_exact(text)  # the terminal's echo
    child.expect(STATS)
    answer = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before).strip()
    new, reused, n, tps, note = child.match.groups()
    child.expect_exact(PROMPT)
    return answer, {"new": int(new), "reused": int(reused), "tokens": int(n), "tps": float(tps), "note": note}


@pytest.mark.parametrize("cluster", [[], ["--local-workers", "1"]], ids=["one-node", "two-nodes"])
def test_second_turn_remembers_the_first_and_reuses_its_cache(cluster):
    child = spawn(*cluster, "--max-tokens", "64")  # the 135M model may ramble after the first turn
    try:
        a1, s1 = turn(child, "The secret code is 4711.")
        assert a1 and s1["reused"] == 0 and s1["tokens"] > 0 and s1["tps"] > 0
        a2, s2 = turn(child, "What is the secret code?")
        assert "4711" in a2, a2
        # the first exchange (prompt + answer) came from the KV cache; only the new turn was computed
        assert s2["reused"] >= s1["new"] + s1["tokens"] - 1, (s1, s2)
        assert s2["new"] < 25, s2
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_session_and_ctrl_d_quits():
    child = spawn("--max-tokens", "200")  # long enough to interrupt, short enough if the model rambles
    try:
        child.sendline("Write a very long story about a dragon.")
        child.expect_exact("dragon.")
        child.expect(r"(\w+\W+){5}")  # the answer is streaming
        child.sendintr()
        child.expect(STATS)
        assert child.match.group(5).strip() == "[stopped]"
        assert int(child.match.group(3)) < 300
        child.expect_exact(PROMPT)
        child.sendintr()  # at the prompt: a fresh prompt, the chat goes on
        child.expect_exact(PROMPT)
        answer, stats = turn(child, "What is the capital of France?")
        assert "Paris" in answer and stats["reused"] > 0
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_full_context_drops_the_oldest_turns():
    child = spawn("--max-seq-len", "128", "--max-tokens", "20")
    try:
        _, first = turn(child, "Hello there, how are you doing today?")
        system_and_more = first["new"]
        # turns of up to 20 tokens each until 128 positions overflow: when depends on how long the greedy answers
        # happen to be (any change in the engine's last bits changes them), so keep chatting until it does
        for topic in ("cats", "dogs", "birds", "fish", "horses", "trees", "rivers"):
            child.sendline(f"Tell me about {topic}.")
            if child.expect([r"context full: dropped the oldest (\d+) turn\(s\)", STATS]) == 0:
                break
            child.expect_exact(PROMPT)
        else:
            pytest.fail("7 turns of up to 20 tokens never filled a 128-position context")
        assert int(child.match.group(1)) >= 1
        child.expect(STATS)
        reused = int(child.match.group(2))
        assert 0 < reused < system_and_more  # the system prompt stayed (and stayed cached)
        child.expect_exact(PROMPT)
        child.sendline("word " * 200)
        child.expect(r"message too long: \d+ tokens, the context holds 128")
        child.expect_exact(PROMPT)
        answer, _ = turn(child, "What is 2+2?")  # still chatting
        assert answer
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
