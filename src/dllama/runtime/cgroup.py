"""Where the process's cgroup limits live: the group and each ancestor, for cgroup v1 and v2. Memory (memory.py)
and CPU (threads.py) limits are read through it, so a node in a container or a cgroup sizes itself to what it is
allowed, not to the whole machine."""

from __future__ import annotations

import os
from collections.abc import Iterator


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def group_dirs(controller: str) -> Iterator[tuple[bool, str]]:
    """(is_v2, directory) for the process's group of `controller` and every ancestor, innermost first; the
    tightest limit among them is the one that applies."""
    for line in (read("/proc/self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and controller not in controllers.split(","):
            continue
        if v2:
            root = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
            if not os.path.exists(os.path.join(root, "cgroup.controllers")):
                continue
        else:  # v1 mounts a controller alone or beside its partner (cpu,cpuacct)
            root = next((os.path.join("/sys/fs/cgroup", d) for d in (controller, controllers)
                         if os.path.isdir(os.path.join("/sys/fs/cgroup", d))), None)  # fmt: skip
            if root is None:
                continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            yield v2, os.path.join(root, *parts[:depth])
