"""Two hosts on one machine: network namespaces joined by a veth pair, created and removed by the caller.

Used by the tests and by bench/bench_cluster.py. Needs root and iproute2 (`ip`, `tc`)."""

from __future__ import annotations

import os
import shutil
import subprocess


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class VethPair:
    """namespaces <tag>a (ADDR_A) and <tag>b (ADDR_B) on a private /30, optionally rate-limited with tbf."""

    def __init__(self, tag: str | None = None, rate: str | None = None):
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise RuntimeError("network-namespace tests need root and iproute2 (apt-get install iproute2)")
        n = os.getpid() % 200 + 20
        self.tag = tag or f"dl{os.getpid()}"
        self.ns_a, self.ns_b = f"{self.tag}a", f"{self.tag}b"
        self.addr_a, self.addr_b = f"10.231.{n}.1", f"10.231.{n}.2"
        self.rate = rate
        try:
            _run("ip", "netns", "add", self.ns_a)
            _run("ip", "netns", "add", self.ns_b)
            _run("ip", "link", "add", f"{self.tag}-va", "type", "veth", "peer", "name", f"{self.tag}-vb")
            _run("ip", "link", "set", f"{self.tag}-va", "netns", self.ns_a)
            _run("ip", "link", "set", f"{self.tag}-vb", "netns", self.ns_b)
            for ns, dev, addr in (
                (self.ns_a, f"{self.tag}-va", self.addr_a),
                (self.ns_b, f"{self.tag}-vb", self.addr_b),
            ):
                _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                if rate:  # this kernel has no netem; tbf limits the rate
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                         "burst", "256kb", "latency", "50ms")  # fmt: skip
        except BaseException:
            self.close()
            raise

    def prefix(self, ns: str) -> list[str]:
        """Command prefix that runs a program inside namespace `ns`."""
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
