"""cgroups for tests and benchmarks, created and removed by the caller (needs root):
- MemoryCgroup: run a process inside its own memory cgroup (v1 `memory` controller, or v2) with an optional limit,
  and read its peak;
- CpuCgroup: a CPU budget (CFS quota per period: v1 `cpu` controller, or v2 `cpu.max`) with its CPU usage and
  throttling counters, so several emulated hosts on one machine each get a fixed share of it."""

from __future__ import annotations

import os
import shlex
import uuid

V1 = "/sys/fs/cgroup/memory"
V1_CPU = "/sys/fs/cgroup/cpu"
V1_CPUACCT = "/sys/fs/cgroup/cpuacct"
V2 = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"


def _procs_prefix(procs_files: list[str]) -> list[str]:
    """Command prefix: a shell joins the cgroups (writes its pid to each cgroup.procs), then execs the rest of argv,
    so the program and all its children run inside them. Put it before `ip netns exec`, whose fresh /sys hides the
    cgroup file systems."""
    join = " && ".join(f"echo $$ > {shlex.quote(f)}" for f in procs_files)
    return ["sh", "-c", f'{join} && exec "$@"', "sh"]


class MemoryCgroup:
    def __init__(self, limit: int | None = None, tag: str = "dllama"):
        if os.geteuid() != 0:
            raise RuntimeError("memory cgroups need root")
        self.v1 = os.path.isdir(V1)
        base = V1 if self.v1 else V2
        self.path = os.path.join(base, f"{tag}-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.path)
        if limit is not None:
            self._write("memory.limit_in_bytes" if self.v1 else "memory.max", str(limit))
        if self.v1:  # no swap here, but make sure the limit also covers it where there is
            try:
                self._write("memory.memsw.limit_in_bytes", str(limit)) if limit else None
            except OSError:
                pass

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read().strip()

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside this cgroup (the shell joins it, then execs the command)."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["sh", "-c", f"echo $$ > {procs} && exec {shlex.join(argv)}"]

    def peak(self) -> int:
        """Peak usage in bytes (v1 max_usage_in_bytes, v2 memory.peak), page cache included."""
        return int(self._read("memory.max_usage_in_bytes" if self.v1 else "memory.peak"))

    def oom_killed(self) -> bool:
        if self.v1:
            return "oom_kill 1" in self._read("memory.oom_control") or self._read("memory.failcnt") not in ("0",)
        return any(line.startswith("oom_kill ") and not line.endswith(" 0") for line in self._read("memory.events").splitlines())

    def close(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



class CpuCgroup:
    """A CPU budget of quota_us per period_us (5000 / 10000 = half a core; the short period keeps a throttled node
    from stalling the others for long at each synchronisation). v1: a group under the `cpu` hierarchy (plus one under
    `cpuacct` for the usage); v2 (only if v1 has no `cpu` hierarchy): cpu.max, usage from cpu.stat. burst_us: unused
    quota the group may save up and spend later (cfs_burst_us / cpu.max.burst), at most quota_us."""

    def __init__(self, quota_us: int = 5000, period_us: int = 10000, burst_us: int = 0, tag: str = "dllama"):
        if os.geteuid() != 0:
            raise RuntimeError("CPU cgroups need root")
        if quota_us < 1000 or period_us < 1000:  # the kernel's minimum for both (EINVAL below it)
            raise ValueError("quota_us and period_us must be >= 1000")
        self.quota_us, self.period_us = quota_us, period_us
        self.v1 = os.path.isfile(os.path.join(V1_CPU, "cpu.cfs_quota_us"))
        name = f"{tag}-{uuid.uuid4().hex[:8]}"
        self.paths: list[str] = []
        try:
            if self.v1:
                self.path = self._mkdir(V1_CPU, name)
                self._write("cpu.cfs_period_us", str(period_us))
                self._write("cpu.cfs_quota_us", str(quota_us))
                if burst_us:
                    self._write("cpu.cfs_burst_us", str(burst_us))
                self.acct = self._mkdir(V1_CPUACCT, name) if os.path.isdir(V1_CPUACCT) else None
            else:
                with open(os.path.join(V2, "cgroup.controllers")) as f:
                    if "cpu" not in f.read().split():
                        raise RuntimeError(f"no cgroup v1 `cpu` hierarchy and no `cpu` controller in {V2}")
                with open(os.path.join(V2, "cgroup.subtree_control"), "w") as f:
                    f.write("+cpu")
                self.path = self._mkdir(V2, name)
                self._write("cpu.max", f"{quota_us} {period_us}")
                if burst_us:
                    self._write("cpu.max.burst", str(burst_us))
                self.acct = None
        except BaseException:
            self.close()
            raise

    def _mkdir(self, base: str, name: str) -> str:
        path = os.path.join(base, name)
        os.mkdir(path)
        self.paths.append(path)
        return path

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    @property
    def cores(self) -> float:
        return self.quota_us / self.period_us

    def prefix(self) -> list[str]:
        """Command prefix that runs a program (and its children) inside this cgroup."""
        return _procs_prefix([os.path.join(p, "cgroup.procs") for p in self.paths])

    def wrap(self, argv: list[str]) -> list[str]:
        return [*self.prefix(), *argv]

    def stat(self) -> dict[str, float]:
        """Cumulative: usage_s (CPU time of the group), periods (with runnable tasks), throttled (periods that hit
        the quota), throttled_s (time the group spent throttled)."""
        with open(os.path.join(self.path, "cpu.stat")) as f:
            raw = dict(line.split() for line in f if line.strip())
        out = {"periods": float(raw["nr_periods"]), "throttled": float(raw["nr_throttled"])}
        if self.v1:
            out["throttled_s"] = int(raw["throttled_time"]) / 1e9
            usage = None
            if self.acct:
                with open(os.path.join(self.acct, "cpuacct.usage")) as f:
                    usage = int(f.read()) / 1e9
            out["usage_s"] = usage if usage is not None else float("nan")
        else:
            out["throttled_s"] = int(raw["throttled_usec"]) / 1e6
            out["usage_s"] = int(raw["usage_usec"]) / 1e6
        return out

    def pids(self) -> list[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def close(self) -> None:
        """Remove the groups (they must have no processes left: kill and wait for them first)."""
        for p in reversed(self.paths):
            try:
                os.rmdir(p)
            except OSError:
                pass
        self.paths = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
