"""A real shaped network on one Linux machine: one network namespace per rank.

:class:`NetnsLab` creates N namespaces joined through veth pairs to a bridge (which
lives in a namespace of its own, so the host's network is never touched), gives rank r
the private address ``10.231.<lab>.<r+1>``, and rate-limits both directions of every
rank's link with ``tc`` (token bucket filter): a switched network with full-duplex
links of ``rate_mbit`` each. This kernel has no ``netem``, so latency, jitter and loss
stay in the application (the runner's link model).

Needs root (CAP_NET_ADMIN) and iproute2; refuses clearly otherwise. Everything is
removed on exit from the ``with`` block, also when the body raises.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional


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
        self.lab_id = (os.getpid() % 200) + 20 if lab_id is None else lab_id
        self.tag = f"astra{self.lab_id}"
        self._made: List[str] = []

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
        try:
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
