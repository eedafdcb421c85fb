"""Hosts on one machine, created and removed by the caller: two network namespaces joined by a veth pair (VethPair),
or N namespaces on a switch (Star: a Linux bridge in its own namespace, one veth per host, both ends rate-limited).

Used by the tests and by bench/bench_cluster.py, bench/bench_home_cluster.py. Needs root and iproute2 (`ip`, `tc`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


def text_of(stdout: str) -> str:
    """The generated text of `dllama inference`, without the timing table that follows it."""
    return re.split(r"\n\n(?: token|prompt:)", stdout)[0]


def loopback_text(args: list[str], timeout: float = 180) -> str:
    """What `dllama inference <args> --local-workers 1` generates: the same 2-node split on loopback. The arithmetic
    is deterministic, so a run across namespaces must generate exactly this."""
    r = subprocess.run([sys.executable, "-m", "dllama", "inference", *args, "--local-workers", "1"],
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return text_of(r.stdout)

def _run(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or f'exit {r.returncode}'}")


def _need_root() -> None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        raise RuntimeError("network-namespace tests need root and iproute2 (apt-get install iproute2)")


def _tbf(ns: str, dev: str, rate: str, burst: str) -> None:
    """Limit what `dev` sends to `rate` (this kernel has no netem, so no added latency; tbf limits the rate)."""
    _run("ip", "-n", ns, "link", "set", dev, "up")
    _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency", "50ms")


class VethPair:
    """namespaces <tag>a (ADDR_A) and <tag>b (ADDR_B) on a private /30, optionally rate-limited with tbf."""

    def __init__(self, tag: str | None = None, rate: str | None = None):
        _need_root()
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



def _bridge_nf_off(ns: str) -> None:
    """No netfilter on bridged frames in namespace ns (per-namespace sysctls; absent if br_netfilter is not loaded)."""
    for fam in ("iptables", "ip6tables", "arptables"):
        path = f"net.bridge.bridge-nf-call-{fam}"
        if subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", path], capture_output=True).returncode == 0:
            _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{path}=0")


class Star:
    """n hosts on one switch, like a home cluster on a gigabit switch: namespaces <tag>n0 .. <tag>n{n-1} (addresses
    10.232.X.1 .. 10.232.X.n on a /24), each with one veth whose other end is a port of the bridge `br0` in the
    namespace <tag>sw. With `rate`, tbf limits both ends of every veth: a host's upload (its end) and its download
    (the switch's end), as on a full-duplex link. Deleting the namespaces removes the veths and the bridge."""

    def __init__(self, n: int, tag: str | None = None, rate: str | None = None, burst: str = "256kb"):
        _need_root()
        if not 1 <= n <= 250:
            raise ValueError("a star has 1 to 250 hosts")
        self.n, self.rate = n, rate
        self.tag = tag or f"dls{os.getpid() % 100000}"
        if len(self.tag) > 10:  # interface names are at most 15 bytes: <tag>-<i>h
            raise ValueError("tag too long (at most 10 characters)")
        x = os.getpid() % 200 + 20
        self.ns_switch = f"{self.tag}sw"
        self.namespaces = [f"{self.tag}n{i}" for i in range(n)]
        self.addrs = [f"10.232.{x}.{i + 1}" for i in range(n)]
        self._made: list[str] = []
        try:
            self._add_ns(self.ns_switch)
            _run("ip", "-n", self.ns_switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.ns_switch, "link", "set", "br0", "up")
            # a switch forwards frames in hardware; with br_netfilter loaded, the kernel would also run every
            # bridged frame through iptables, on the CPU (and budget) of the node that sent it
            _bridge_nf_off(self.ns_switch)
            for i, (ns, addr) in enumerate(zip(self.namespaces, self.addrs, strict=True)):
                self._add_ns(ns)
                host, port = f"{self.tag}-{i}h", f"{self.tag}-{i}s"
                _run("ip", "link", "add", host, "type", "veth", "peer", "name", port)
                _run("ip", "link", "set", host, "netns", ns)
                _run("ip", "link", "set", port, "netns", self.ns_switch)
                _run("ip", "-n", self.ns_switch, "link", "set", port, "master", "br0")
                _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", host)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                if rate:
                    _tbf(ns, host, rate, burst)
                    _tbf(self.ns_switch, port, rate, burst)
                _run("ip", "-n", ns, "link", "set", host, "up")
                _run("ip", "-n", self.ns_switch, "link", "set", port, "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._made.append(ns)

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program on host i."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
