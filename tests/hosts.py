"""Test hosts for multi-node runs: network namespaces on this machine, each with its own address and sshd.

Every host is a network namespace joined to a bridge by a veth link (taking the link down partitions the
host), running its own sshd that accepts a throwaway key. The machine's files are shared, as a cluster's
shared storage would be. DeepSpeed's launcher reaches the hosts through pdsh and ssh, exactly as on a
cluster; `env` gives the launching process an `ssh` that uses the throwaway key and a DS_ENV_FILE
(DeepSpeed's `.deepspeed_env`) with the variables every rank needs. Needs root, iproute2, openssh-server
and pdsh (`make test` installs the last two). Traffic goes only to these hosts' addresses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from pipeline.launch import LAUNCHER_VARIABLES, free_port
from tests import procs

SSHD = "/usr/sbin/sshd"


def _run(*command: str) -> str:
    """Run a command, failing with its output."""
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Hosts:
    """`count` test hosts; `names` are their addresses (what a hostfile lists)."""

    made = 0

    def __init__(self, folder: Path, count: int = 2):
        for tool in ("ip", "pdsh", SSHD, "ssh-keygen"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} not found: the multi-node tests need iproute2, pdsh and openssh-server "
                                   "(make test installs them)")  # fmt: skip
        # A tag of this process and instance: two sets of hosts never share a name, even while one is going away.
        Hosts.made += 1
        self.folder, tag = folder, (os.getpid() * 8 + Hosts.made) % 10000
        # A subnet and interface names of this process's own, so concurrent or leftover runs do not collide.
        self.subnet = f"10.{70 + tag % 50}.{tag // 50 % 250}"
        self.bridge, self.namespaces = f"tbr{tag}", [f"tsth{tag}-{i}" for i in range(count)]
        self.links = [f"tv{tag}x{i}" for i in range(count)]
        self.names = [f"{self.subnet}.{11 + i}" for i in range(count)]
        try:
            self._network()
            self._ssh()
        except Exception:
            self.close()
            raise

    def _network(self) -> None:
        """The bridge, and per host a namespace joined to it by a veth pair."""
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for ns, link, address in zip(self.namespaces, self.links, self.names, strict=True):
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", link, "master", self.bridge)
            _run("ip", "link", "set", link, "up")
            for command in (["addr", "add", f"{address}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                            ["link", "set", "lo", "up"]):  # fmt: skip
                _run("ip", "netns", "exec", ns, "ip", *command)

    def _ssh(self) -> None:
        """A throwaway key, an sshd per host that accepts it, and an `ssh` on PATH that offers it."""
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        for key in ("id", "hostkey"):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(f / key))
        shutil.copy(f / "id.pub", f / "authorized_keys")
        (f / "sshd_config").write_text(
            f"HostKey {f / 'hostkey'}\nAuthorizedKeysFile {f / 'authorized_keys'}\nPermitRootLogin yes\n"
            "PasswordAuthentication no\nStrictModes no\nUsePAM no\n"
        )
        (f / "ssh_config").write_text(
            f"Host {self.subnet}.*\n    IdentityFile {f / 'id'}\n    StrictHostKeyChecking no\n"
            "    UserKnownHostsFile /dev/null\n    BatchMode yes\n    LogLevel ERROR\n    ConnectTimeout 5\n"
            # A host whose link goes down ends its ssh (and so pdsh and the launcher) after 15 s, not never.
            "    ServerAliveInterval 5\n    ServerAliveCountMax 3\n"
        )
        (f / "bin").mkdir(exist_ok=True)
        (f / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {f / "ssh_config"} "$@"\n')
        (f / "bin" / "ssh").chmod(0o755)
        Path("/run/sshd").mkdir(exist_ok=True)
        for ns, address in zip(self.namespaces, self.names, strict=True):
            self.start_sshd(ns, address)

    def start_sshd(self, ns: str, address: str, seconds: float = 60) -> None:
        """(Re)start a host's sshd, listening on its address only. sshd binds after it daemonizes, so a port still held
        by a process on its way out shows only as a missing pid file: start again until the deadline."""
        pid_file, log = self.folder / f"sshd-{address}.pid", self.folder / f"sshd-{address}.log"
        deadline = time.monotonic() + seconds
        while True:
            pid_file.unlink(missing_ok=True)
            _run("ip", "netns", "exec", ns, SSHD, "-f", str(self.folder / "sshd_config"), "-o",
                 f"ListenAddress={address}", "-o", f"PidFile={pid_file}", "-E", str(log))  # fmt: skip
            attempt = time.monotonic() + 5
            while time.monotonic() < min(attempt, deadline):
                if pid_file.exists() and pid_file.read_text().strip():
                    return
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
                raise RuntimeError(f"sshd on test host {address} did not start in {seconds:.0f} s: {tail}")

    def sshd_running(self, host: int) -> bool:
        pid_file = self.folder / f"sshd-{self.names[host]}.pid"
        try:
            return "sshd" in command_line(int(pid_file.read_text()))
        except (OSError, ValueError):
            return False

    def ready(self) -> None:
        """Every host up, as the next test expects, whatever the last one left: its link up, its sshd running."""
        for host in range(len(self.names)):
            self.link(host, up=True)
            if not self.sshd_running(host):
                self.start_sshd(self.namespaces[host], self.names[host])

    def env(self, variables: dict[str, str]) -> dict[str, str]:
        """The launching process's environment: the test `ssh` first on PATH, and `variables` (with the gloo
        interface of the hosts) in DeepSpeed's env file, which its launcher exports on every host."""
        env_file = self.folder / "deepspeed_env"
        # procs.MARK: the ranks on the hosts end with the test that started them, like its local processes.
        exported = {"GLOO_SOCKET_IFNAME": "eth0", procs.MARK: procs.TOKEN, **variables}
        env_file.write_text("".join(f"{k}={v}\n" for k, v in exported.items()))
        # Without the rendezvous variables of this process (a test's own process group is not the job's).
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        return {**env, "PATH": f"{self.folder / 'bin'}:{os.environ['PATH']}", "DS_ENV_FILE": str(env_file)}

    def hostfile(self, slots: int, names: list[str] | None = None) -> Path:
        """A DeepSpeed hostfile of these hosts (or `names`), `slots` ranks each."""
        path = self.folder / f"hostfile-{slots}"
        path.write_text("".join(f"{name} slots={slots}\n" for name in names or self.names))
        return path

    def pids(self, host: int, running: str = "") -> list[int]:
        """The processes running in a host's namespace (those whose command line contains `running`)."""
        pids = [int(p) for p in _run("ip", "netns", "pids", self.namespaces[host]).split()]
        return [p for p in pids if running in command_line(p)]

    def link(self, host: int, up: bool) -> None:
        """Take a host's link down (its sockets stay open, and silent: a partition) or back up."""
        _run("ip", "link", "set", self.links[host], "up" if up else "down")

    def kill(self, host: int, seconds: float = 30) -> None:
        """kill -9 every process on a host (its sshd too), until none is left (one may fork while the others die), then
        restart its sshd, as a rebooted node would."""
        deadline = time.monotonic() + seconds
        while pids := self.pids(host):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes on test host {self.names[host]} outlived kill -9: {pids}")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self.start_sshd(self.namespaces[host], self.names[host])

    def close(self) -> None:
        """Stop every process of the hosts and remove the namespaces and the bridge."""
        for ns in self.namespaces:
            proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in proc.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Slurm:
    """A SLURM cluster of the test hosts: munged (a throwaway key, its own socket) and slurmctld on this machine at
    the bridge's address, and a slurmd per host in its namespace, named node0, node1, ... Every file lives in the
    hosts' folder: SLURM_CONF in `env` points srun, sbatch and scontrol at it. The node names resolve inside the
    namespaces (ip netns exec bind-mounts /etc/netns/<ns>/hosts over /etc/hosts), as a cluster's DNS would do.
    Needs slurm-wlm and munge (make test installs them); no cgroups (proctrack/linuxproc, task/none)."""

    def __init__(self, hosts: Hosts):
        self.hosts, self.folder = hosts, hosts.folder / "slurm"
        self.names = [f"node{i}" for i in range(len(hosts.names))]
        self.daemons: list[subprocess.Popen] = []
        self.folder.mkdir()
        try:
            self._munge()
            self._configure()
            self._start()
        except Exception:
            self.close()
            raise

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.folder / "slurm.conf")}

    def _munge(self) -> None:
        f = self.folder
        (f / "munge.key").write_bytes(os.urandom(1024))
        (f / "munge.key").chmod(0o600)
        files = {"key-file": "munge.key", "socket": "munge.socket", "pid-file": "munged.pid", "log-file": "munged.log",
                 "seed-file": "munged.seed"}  # fmt: skip
        _run("munged", "--force", *(f"--{option}={f / name}" for option, name in files.items()))

    def _configure(self) -> None:
        f, h = self.folder, self.hosts
        for sub in ("state", "spool", *(f"spool/{n}" for n in self.names)):
            (f / sub).mkdir()
        pairs = list(zip(self.names, h.names, strict=True))
        nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs=2 State=UNKNOWN\n" for n, a in pairs)
        (f / "slurm.conf").write_text(
            f"ClusterName=test\nSlurmctldHost={socket.gethostname()}({h.subnet}.1)\nSlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={f / 'munge.socket'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nSlurmdParameters=config_overrides\n"
            "ReturnToService=2\nMpiDefault=none\nMailProg=/bin/true\nSlurmdTimeout=10\nInactiveLimit=0\nKillWait=5\n"
            # sbatch --wait polls every 2 s while MinJobAge/2 allows (with the default 300 s, after 2, 8 and 32 s).
            "MinJobAge=4\n"
            # The controller listens on this machine: a free port, so that two clusters never collide.
            f"SlurmctldPort={free_port()}\n"
            f"StateSaveLocation={f / 'state'}\nSlurmdSpoolDir={f / 'spool'}/%n\n"
            f"SlurmctldPidFile={f / 'slurmctld.pid'}\nSlurmdPidFile={f / 'spool'}/slurmd-%n.pid\n"
            f"SlurmctldLogFile={f / 'slurmctld.log'}\nSlurmdLogFile={f / 'spool'}/slurmd-%n.log\n"
            f"{nodes}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        # The v1 plugin loads without a cgroup v1 hierarchy; autodetect would fail on this machine's mounts.
        (f / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        lines = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in pairs)
        for ns in h.namespaces:
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(lines)

    def _start(self) -> None:
        env = {**os.environ, **self.env}
        log = open(self.folder / "daemons.log", "a")  # noqa: SIM115 (open while the daemons run)
        self.daemons.append(subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=log, stderr=log))
        for i in range(len(self.names)):
            self.start_slurmd(i)
        self.wait_idle()

    def start_slurmd(self, host: int) -> None:
        """(Re)start a host's slurmd, as its node booting would."""
        env = {**os.environ, **self.env}
        log = open(self.folder / "daemons.log", "a")  # noqa: SIM115
        command = ["ip", "netns", "exec", self.hosts.namespaces[host], "slurmd", "-D", "-N", self.names[host]]
        self.daemons.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))

    def ready(self) -> None:
        """Every node idle, as the next test expects: a slurmd started again on a host whose slurmd a test killed."""
        for host in range(len(self.names)):
            if not self.hosts.pids(host, running="slurmd"):
                self.start_slurmd(host)
        self.wait_idle()

    def wait_idle(self, seconds: float = 60) -> None:
        """Wait until every node is idle (up, running nothing)."""
        deadline, env = time.monotonic() + seconds, {**os.environ, **self.env}
        while True:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env)
            states = dict(line.split() for line in proc.stdout.splitlines())
            if sorted(states) == self.names and set(states.values()) == {"idle"}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM nodes not idle after {seconds} s: {states or proc.stderr.strip()}")
            time.sleep(0.5)

    def close(self) -> None:
        """Stop the daemons and remove the names."""
        for daemon in self.daemons:
            daemon.kill()
            daemon.wait()
        pid_file = self.folder / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        for ns in self.hosts.namespaces:
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
