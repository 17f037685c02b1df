"""A real shaped network on one Linux machine: one network namespace per rank.

:class:`NetnsLab` creates N namespaces joined through veth pairs to a bridge (which
lives in a namespace of its own, so the host's network is never touched), gives rank r
the private address ``10.231.<lab>.<r+1>``, and rate-limits both directions of every
rank's link with ``tc`` (token bucket filter): a switched network with full-duplex
links of ``rate_mbit`` each. This kernel has no ``netem``, so latency, jitter and loss
stay in the application (the runner's link model).

Needs root (CAP_NET_ADMIN) and iproute2; refuses clearly otherwise. Everything is
removed on exit from the ``with`` block, also when the body raises. A run killed
outright (SIGKILL, power loss) cannot clean up: each lab records its owner's pid in
``/run/astra-netns``, and the next lab removes the namespaces of labs whose owner is
gone (with a warning naming them) and takes a lab id no live lab uses.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from typing import Dict, List, Optional

OWNERS = "/run/astra-netns"  # <tag>.pid: the pid of the process that made lab <tag>
_NAME = re.compile(r"^(astra(\d+))-(hub|r\d+)$")


class NetnsError(RuntimeError):
    pass


def netns_supported() -> Optional[str]:
    """``None`` when namespaces can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    return None


def _run(*cmd: str) -> None:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if res.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")


def _labs() -> Dict[str, List[str]]:
    """Every Astra lab's namespaces on this machine: ``{tag: [namespace, ...]}``."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    labs: Dict[str, List[str]] = {}
    for line in res.stdout.splitlines():
        m = _NAME.match(line.split(" ")[0]) if line.strip() else None
        if m:
            labs.setdefault(m.group(1), []).append(m.group(0))
    return labs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(tag: str) -> Optional[int]:
    try:
        with open(os.path.join(OWNERS, f"{tag}.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def remove_stale_labs() -> List[str]:
    """Delete the namespaces of labs whose owning process is gone (or unknown: made
    before owners were recorded); their tags."""
    stale = []
    for tag, names in sorted(_labs().items()):
        pid = _owner(tag)
        if pid is not None and _alive(pid):
            continue
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        try:
            os.remove(os.path.join(OWNERS, f"{tag}.pid"))
        except OSError:
            pass
        stale.append(tag)
    return stale


class NetnsLab:
    """``with NetnsLab(n, rate_mbit) as lab:`` then run rank r under ``lab.prefix(r)``."""

    def __init__(self, ranks: int, rate_mbit: float, burst_kbit: int = 32,
                 lab_id: Optional[int] = None):
        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        if rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be > 0, got {rate_mbit}")
        self.ranks = ranks
        self.rate_mbit = rate_mbit
        self.burst_kbit = burst_kbit
        self.lab_id = lab_id
        self.tag = f"astra{lab_id}" if lab_id is not None else ""
        self._made: List[str] = []
        self._owner_file: Optional[str] = None

    def ns(self, rank: int) -> str:
        return f"{self.tag}-r{rank}"

    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    def addr(self, rank: int) -> str:
        return f"10.231.{self.lab_id}.{rank + 1}"

    def ifname(self, rank: int) -> str:
        """Rank ``rank``'s interface inside its namespace (for ``GLOO_SOCKET_IFNAME``)."""
        return f"{self.tag}r{rank}a"[:15]

    def prefix(self, rank: int) -> List[str]:
        """Command prefix that runs a program inside rank ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.ns(rank)]

    def __enter__(self) -> "NetnsLab":
        why = netns_supported()
        if why:
            raise NetnsError(f"cannot build the netns link: {why}")
        stale = remove_stale_labs()
        if stale:
            warnings.warn(f"removed the network namespaces of {len(stale)} earlier run(s) "
                          f"that died without cleaning up: {', '.join(stale)}", stacklevel=2)
        if self.lab_id is None:  # the first id from a pid-derived start that no lab uses
            used = {int(t[len("astra"):]) for t in _labs()}
            start = os.getpid() % 200
            self.lab_id = next(20 + (start + i) % 200 for i in range(200)
                               if 20 + (start + i) % 200 not in used)
            self.tag = f"astra{self.lab_id}"
        try:
            os.makedirs(OWNERS, exist_ok=True)
            self._owner_file = os.path.join(OWNERS, f"{self.tag}.pid")
            with open(self._owner_file, "w") as f:
                f.write(str(os.getpid()))
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _tbf(self, ns: str, dev: str) -> None:
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", f"{self.rate_mbit}mbit", "burst", f"{self.burst_kbit}kbit", "latency", "50ms")

    def _setup(self) -> None:
        _run("ip", "netns", "add", self.hub)
        self._made.append(self.hub)
        _run("ip", "netns", "exec", self.hub, "ip", "link", "add", "br0", "type", "bridge")
        _run("ip", "netns", "exec", self.hub, "ip", "link", "set", "br0", "up")
        for r in range(self.ranks):
            ns = self.ns(r)
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            a, b = self.ifname(r), f"{self.tag}r{r}b"[:15]
            _run("ip", "link", "add", a, "netns", ns, "type", "veth", "peer", "name", b,
                 "netns", self.hub)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr(r)}/24", "dev", a)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", a, "up")
            _run("ip", "netns", "exec", self.hub, "ip", "link", "set", b, "master", "br0")
            _run("ip", "netns", "exec", self.hub, "ip", "link", "set", b, "up")
            self._tbf(ns, a)          # rank -> bridge (uplink)
            self._tbf(self.hub, b)    # bridge -> rank (downlink)

    def teardown(self) -> None:
        """Delete every namespace this lab made (their veths go with them)."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        if self._owner_file:
            try:
                os.remove(self._owner_file)
            except OSError:
                pass
            self._owner_file = None
