"""A private two-host SLURM cluster on one machine (not a test module; tests/test_multinode.py uses it).

Each host (``node1``, ``node2``) is its own network, UTS and mount namespace: its own hostname, its own IP on a
private bridge, and the fixture's hosts file bind-mounted over ``/etc/hosts``, so the names resolve inside the hosts
(the machine's ``/etc/hosts`` is never edited). Each runs its own slurmd; munged and slurmctld run on the machine
and serve both (slurmctld on the bridge's address, munge through its socket file). Traffic stays on the bridge and
the loopback. Needs root, ``ip`` (iproute2), ``nsenter`` / ``unshare`` (util-linux) and slurm-wlm.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import (LocalSlurm, _binary, _free_ports, _running, _terminate, session_cluster,
                           unavailable as slurm_unavailable)

HOSTS = ("node1", "node2")


def unavailable() -> str | None:
    """Why this machine cannot run the two-host cluster, or None."""
    reason = slurm_unavailable()
    if reason:
        return reason.replace("SLURM tests", "two-host SLURM tests")
    missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b) is None]
    if missing:
        return f"two-host SLURM tests skipped: {', '.join(missing)} not found (apt-get install -y iproute2 util-linux)"
    probe = subprocess.run(["ip", "netns", "add", f"ltprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"two-host SLURM tests skipped: cannot make a network namespace ({probe.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", f"ltprobe{os.getpid()}"], capture_output=True)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no interface of the machine uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for i in range(os.getpid() % 200, os.getpid() % 200 + 200):
        net = ipaddress.ip_network(f"10.{100 + i % 150}.{(i * 7) % 250}.0/24")
        if not any(ipaddress.ip_interface(w).ip in net for line in used.splitlines()
                   for w in line.split() if "/" in w and w[0].isdigit()):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the two-host cluster")


def _ip(*args: str):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class TwoHostSlurm(LocalSlurm):
    """start() / stop(); run SLURM's commands from the machine (as LocalSlurm); :meth:`on_host` runs a command
    inside a host, :meth:`lose_host` makes a host vanish (link down, every process killed), :meth:`restore_host`
    brings it back."""

    def __init__(self, root: Path, env: dict | None = None):
        super().__init__(root, env)
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"ltbr{tag}"
        self.netns = {h: f"lt{tag}{h}" for h in HOSTS}
        self.veth = {h: f"lt{tag}v{i}" for i, h in enumerate(HOSTS, 1)}
        net = _free_subnet()
        self.prefix = net.prefixlen
        self.addr = {"ctl": str(net[1]), **{h: str(net[10 + i]) for i, h in enumerate(HOSTS, 1)}}
        self.hosts_file = self.root / "hosts"

    # ---- the hosts ----------------------------------------------------------------------------------------

    def _network_up(self):
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.addr['ctl']}/{self.prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for h in HOSTS:
            ns = self.netns[h]
            _ip("netns", "add", ns)
            _ip("link", "add", self.veth[h], "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", self.veth[h], "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[h]}/{self.prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{self.addr[h]} {h}\n" for h in HOSTS) + f"{self.addr['ctl']} {self.node}\n")

    def _network_down(self):
        for h in HOSTS:
            subprocess.run(["ip", "netns", "del", self.netns[h]], capture_output=True)  # (its veth goes with it)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def _in_host(self, host: str, command: str) -> list[str]:
        """argv that runs the shell ``command`` as host ``host``: its network namespace, a new UTS namespace
        named after it and a private mount namespace with the fixture's /etc/hosts."""
        return ["nsenter", f"--net=/run/netns/{self.netns[host]}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c",
                f"hostname {host} && mount --bind {self.hosts_file} /etc/hosts && exec {command}"]

    def on_host(self, host: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside ``host`` (its slurmd's namespaces)."""
        pid = self._pids[f"slurmd-{host}"]
        return subprocess.run(["nsenter", "-t", str(pid), "-n", "-u", "-m", *cmd], capture_output=True, text=True,
                              env=self.env, **kw)

    def host_pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns[host]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def lose_host(self, host: str):
        """The host is gone as in a power loss: its link goes down first (no connection is closed politely), then
        every process in it (slurmd, slurmstepd, the job's ranks and loader workers) is killed."""
        _ip("link", "set", self.veth[host], "down")
        for _ in range(3):
            for pid in self.host_pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self._pids.pop(f"slurmd-{host}", None)

    def restore_host(self, host: str, timeout: float = 60):
        """Link up, slurmd started again; waits until slurmctld has it back in service."""
        _ip("link", "set", self.veth[host], "up")
        self._start_slurmd(host)
        self.wait_until(lambda: self._node_state(host) in ("idle", "mixed", "allocated"), timeout,
                        f"{host} to return to service")

    def _node_state(self, host: str) -> str:
        out = self.run(["sinfo", "-h", "-N", "-n", host, "-o", "%T"], check=False).stdout.strip()
        return out.rstrip("*~#")

    def _start_slurmd(self, host: str):
        pid_file = self.root / f"slurmd.{host}.pid"
        pid_file.unlink(missing_ok=True)
        self._daemon(f"slurmd-{host}", self._in_host(host, f"{_binary('slurmd')} -f {self.conf} -N {host}"),
                     pid_file)

    # ---- daemons ------------------------------------------------------------------------------------------

    def _write_config(self):
        super()._write_config()  # munge key, dirs, ports, cgroup.conf; the node and partition lines change below
        text = self.conf.read_text()
        ctld_port = next(int(line.split("=")[1]) for line in text.splitlines() if line.startswith("SlurmctldPort"))
        cpus = os.cpu_count()
        mem_mb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) // 1024
        keep = [line for line in text.splitlines()
                if not line.startswith(("SlurmctldHost", "SlurmdPidFile", "SlurmdLogFile", "SlurmdSpoolDir",
                                        "NodeName", "PartitionName", "SlurmdPort", "SlurmctldPort"))]
        d_port = _free_ports(1)[0]
        (self.root / "spool").mkdir(exist_ok=True)
        self.conf.write_text("\n".join(keep) + f"""
SlurmctldHost={self.node}({self.addr['ctl']})
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmdPidFile={self.root}/slurmd.%n.pid
SlurmdLogFile={self.root}/log/slurmd.%n.log
SlurmdSpoolDir={self.root}/spool/%n
# a host that stops answering is DOWN after this many seconds (its jobs end NODE_FAIL)
SlurmdTimeout=10
NodeName=node1 NodeAddr={self.addr['node1']} CPUs={cpus} RealMemory={mem_mb * 3 // 8} State=UNKNOWN
NodeName=node2 NodeAddr={self.addr['node2']} CPUs={cpus} RealMemory={mem_mb * 3 // 8} State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def start(self, timeout: float = 90):
        self._network_up()
        try:
            self._write_config()
            self._start_controller()
            for h in HOSTS:
                self._start_slurmd(h)
            self.wait_until(lambda: all(self._node_state(h) == "idle" for h in HOSTS), timeout,
                            "both hosts to come up idle")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30):
        try:
            if "slurmctld" in self._pids:
                self.cancel_all(timeout)
        finally:
            pids = [self._pids.pop(n) for n in [f"slurmd-{h}" for h in HOSTS] + ["slurmctld", "munged"]
                    if n in self._pids]
            _terminate(pids, timeout)
            for h in HOSTS:  # whatever a lost host's jobs left behind
                for pid in self.host_pids(h):
                    if _running(pid):
                        os.kill(pid, signal.SIGKILL)
            self._network_down()
            for h in HOSTS:
                for d in sorted(self.freezer.glob(f"slurm_{h}/**/"), key=lambda p: -len(p.parts)):
                    try:
                        d.rmdir()
                    except OSError:
                        pass


@pytest.fixture(scope="session")
def two_hosts(tmp_path_factory):
    """The running two-host cluster for the session (see ``slurm_cluster.session_cluster``)."""
    yield from session_cluster(TwoHostSlurm, tmp_path_factory, "slurm2", why_not=unavailable)


__all__ = ["TwoHostSlurm", "two_hosts", "unavailable"]
