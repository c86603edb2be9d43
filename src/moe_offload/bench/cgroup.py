"""Memory cgroups for `bench --memory-limit`: each mode runs in a child cgroup of this process's own,
so that "runs in N GB" is measured, not assumed.

The limit counts the page cache the process's reads bring in (cgroup v1 memory.limit_in_bytes and v2
memory.max both do), and swap is capped at zero extra where the kernel lets us (v1
memory.memsw.limit_in_bytes, v2 memory.swap.max), so swapping cannot hide an overrun. The process is
moved into the cgroup before it runs anything: the command is started through `sh -c 'echo $$ >
cgroup.procs && exec ...'`, so what it loads is charged from its first page.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILLED_OOM = "killed (out of memory)"


class CgroupError(Exception):
    """The system does not let this process make a memory cgroup; the message says why."""


def _read(path: Path) -> str:
    return path.read_text().strip()


def _mounts() -> list[tuple[str, str, str, list[str]]]:
    """(root, mount point, fstype, super options) of every cgroup mount in /proc/self/mountinfo."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype = fields[sep + 1]
        if fstype in ("cgroup", "cgroup2"):
            options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
            out.append((fields[3], fields[4].replace("\\040", " "), fstype, options))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller name ('' for the unified hierarchy) -> this process's cgroup path in it."""
    own = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return own
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                own[name] = parts[2]
    return own


def _join(mount_root: str, mount_point: str, cgroup_path: str) -> Path | None:
    """The directory of a cgroup path under a mount whose root may itself be a sub-cgroup."""
    rel = os.path.relpath(cgroup_path, mount_root) if mount_root != "/" else cgroup_path.lstrip("/")
    if rel.startswith(".."):
        return None  # the mount does not show our cgroup
    return Path(mount_point) / ("" if rel == "." else rel)


def find_parent() -> tuple[int, Path]:
    """(cgroup version, directory of this process's own memory cgroup); CgroupError if there is none."""
    own, mounts = _own_cgroups(), _mounts()
    for root, point, fstype, options in mounts:  # v1: a hierarchy with the memory controller
        if fstype == "cgroup" and "memory" in options and "memory" in own:
            path = _join(root, point, own["memory"])
            if path is not None and (path / "memory.limit_in_bytes").is_file():
                return 1, path
    for root, point, fstype, _ in mounts:  # v2: the unified hierarchy, if it has the memory controller
        if fstype == "cgroup2" and "" in own:
            path = _join(root, point, own[""])
            if path is None or not path.is_dir():
                continue
            try:
                controllers = _read(path / "cgroup.controllers").split()
            except OSError:
                controllers = []
            if "memory" in controllers:
                return 2, path
            raise CgroupError(f"the cgroup v2 hierarchy at {path} does not offer the memory controller "
                              f"(cgroup.controllers: {' '.join(controllers) or 'empty'})")
    if not mounts:
        raise CgroupError("no cgroup file system is mounted (/proc/self/mountinfo lists none)")
    raise CgroupError("no memory controller: neither a cgroup v1 'memory' hierarchy nor a cgroup v2 hierarchy "
                      "with the memory controller holds this process")


class MemoryCgroup:
    """A child memory cgroup of this process's own, with a hard limit; removed by remove()."""

    def __init__(self, version: int, path: Path, limit_bytes: int, swap_limited: bool):
        self.version, self.path, self.limit_bytes, self.swap_limited = version, path, limit_bytes, swap_limited

    @classmethod
    def create(cls, limit_bytes: int, name: str = "bench") -> "MemoryCgroup":
        version, parent = find_parent()
        path = parent / f"moe-offload-{name}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        if version == 2:
            _enable_memory_controller(parent)
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupError(f"cannot create a child memory cgroup in {parent} ({e.strerror}); "
                              f"this needs write access to the process's own cgroup (root, or a delegated "
                              f"cgroup)") from e
        cg = cls(version, path, limit_bytes, swap_limited=False)
        try:
            cg._set_limit()
        except BaseException:
            cg.remove()
            raise
        return cg

    def _set_limit(self) -> None:
        limit = str(int(self.limit_bytes))
        try:
            if self.version == 1:
                (self.path / "memory.limit_in_bytes").write_text(limit)
                memsw = self.path / "memory.memsw.limit_in_bytes"  # memory + swap: only after the memory limit
                if memsw.exists():
                    try:
                        memsw.write_text(limit)
                        self.swap_limited = True
                    except OSError:
                        pass
                if int(_read(self.path / "memory.limit_in_bytes")) > self.limit_bytes:
                    raise CgroupError(f"the kernel did not keep the limit of {limit} bytes in {self.path}")
            else:
                (self.path / "memory.max").write_text(limit)
                swap = self.path / "memory.swap.max"
                if swap.exists():
                    try:
                        swap.write_text("0")
                        self.swap_limited = True
                    except OSError:
                        pass
        except OSError as e:
            raise CgroupError(f"cannot set a memory limit in {self.path} ({e.strerror})") from e

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def wrap(self, cmd: list[str]) -> list[str]:
        """The command, started inside this cgroup: the shell moves itself in, then execs the command."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_file), *cmd]

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this cgroup (0 if the kernel does not say)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in _read(self.path / name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def hit_limit(self) -> bool:
        """Whether a charge ever failed at the limit (v1 memory.failcnt; v2 memory.events max/oom)."""
        try:
            if self.version == 1:
                return int(_read(self.path / "memory.failcnt")) > 0
            events = dict(line.split() for line in _read(self.path / "memory.events").splitlines())
            return int(events.get("oom", 0)) > 0 or int(events.get("oom_kill", 0)) > 0
        except (OSError, ValueError):
            return False

    def peak_bytes(self) -> int | None:
        """The most memory the cgroup held at once, page cache included (None where the kernel does not say)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int(_read(self.path / name))
        except (OSError, ValueError):
            return None

    def killed_by_oom(self, returncode: int | None) -> bool:
        """Whether a process that ended with this exit status was killed for memory."""
        if self.oom_kills() > 0:
            return True
        return returncode == -signal.SIGKILL and self.hit_limit()

    def remove(self) -> None:
        """Move any process left behind to the parent, release the page cache charged here, rmdir."""
        if not self.path.exists():
            return
        parent_procs = self.path.parent / "cgroup.procs"
        try:
            for pid in _read(self.procs_file).split():
                try:
                    parent_procs.write_text(pid)
                except OSError:
                    pass
        except OSError:
            pass
        if self.version == 1:
            try:
                (self.path / "memory.force_empty").write_text("0")
            except OSError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # a killed process may take a moment to leave

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _enable_memory_controller(parent: Path) -> None:
    """cgroup v2: children get the memory controller only if the parent enables it for its subtree."""
    control = parent / "cgroup.subtree_control"
    try:
        if "memory" in _read(control).split():
            return
        control.write_text("+memory")
    except OSError as e:
        raise CgroupError(f"cannot enable the memory controller for children of {parent} ({e.strerror}); "
                          f"in cgroup v2 a cgroup that holds processes cannot enable controllers for its "
                          f"children: run the bench from a delegated cgroup (e.g. systemd-run --user --scope "
                          f"-p Delegate=yes ...)") from e


def check_available(limit_bytes: int) -> tuple[int, bool]:
    """Make and remove a cgroup with this limit, so that an impossible run fails before any mode runs;
    returns (cgroup version, swap limited too)."""
    cg = MemoryCgroup.create(limit_bytes, "check")
    try:
        return cg.version, cg.swap_limited
    finally:
        cg.remove()
