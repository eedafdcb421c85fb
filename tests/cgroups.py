"""Memory cgroups for tests and benchmarks: run a process inside its own cgroup (v1 `memory` controller, or v2) with
an optional limit, and read its peak. Needs root; created and removed by the caller."""

from __future__ import annotations

import os
import shlex
import uuid

V1 = "/sys/fs/cgroup/memory"
V2 = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"


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
