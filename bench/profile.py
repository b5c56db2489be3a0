#!/usr/bin/env python3
"""The profiles behind bench/profile (run that script, not this file).

Brings up `sealfs up`, runs one workload at a time on the mount while `perf record` samples the
whole machine (cpu-clock, DWARF call stacks), and for each workload writes a flame graph
(docs/profiles/NAME.svg, with inferno) and a table of where the samples fell: idle, the kernel,
and each crate of the `sealfs up` process, by the frame that was running (self time). The
tables go into docs/profiles.md with the machine, the version and the command.

Workloads, the ones the targets name:
- write: fio, 1 GiB sequential write in 1 MiB blocks, fsync at the end;
- read: fio, that file read back in 1 MiB blocks after dropping the caches;
- creates: empty files made by 2 threads, each in a folder of its own;
- tree: a source tree of about 2,600 entries extracted with tar.
"""

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the same sealfs up, fio, caches and source tree as the comparison)

FREQ = 199  # samples a second on each core: two cores, DWARF stacks, a few seconds a workload
STACK = 16384  # bytes of each sampled thread's stack copied for unwinding

# A frame's owner, by the first pattern its symbol matches (the leaf frame decides a sample).
OWNERS = [
    ("redb (metadata state)", re.compile(r"^<?redb::")),
    ("openraft (Raft)", re.compile(r"^<?openraft::")),
    ("sealfs-raft (log)", re.compile(r"^<?sealfs_raft::")),
    ("sealfs-meta (partitions)", re.compile(r"^<?sealfs_meta::")),
    ("sealfs-rpc (wire)", re.compile(r"^<?sealfs_rpc::")),
    ("sealfs-client", re.compile(r"^<?sealfs_client::")),
    ("kelp (cells, stipes)", re.compile(r"^<?kelp::")),
    ("sealfs (mount)", re.compile(r"^<?(sealfs|sealfs_shard|sealfs_manager)::")),
    ("fuser (FUSE)", re.compile(r"^<?fuser::")),
    ("tokio (tasks, timers)", re.compile(r"^<?tokio::")),
    ("erasure code", re.compile(r"(isa_l|erasure|ec_encode|gf_|reed_solomon)", re.I)),
    ("checksums (crc32c, blake3)", re.compile(r"(crc32c|blake3)", re.I)),
    ("serialization (postcard, serde)", re.compile(r"^<?(postcard|serde)::")),
    ("memory (malloc, memcpy)",
     re.compile(r"(malloc|free|memcpy|memmove|memset|memcmp|realloc|unlink_chunk)")),
]

# The prefixes of a system call's first frames under do_syscall_64 (x64_sys_call dispatches).
SYSCALL_PREFIX = re.compile(r"^(__x64_sys_|__se_sys_|__do_sys_|ksys_|do_)")
SYSCALLS = [
    ("fdatasync (log and shard syncs)", ("fdatasync", "fsync", "sync_file_range")),
    ("futex (threads waking threads)", ("futex",)),
    ("read, write (FUSE requests, sockets)",
     ("read", "write", "readv", "writev", "sendmsg", "recvmsg", "sendto", "recvfrom")),
    ("pread, pwrite (shard and log files)", ("pread64", "pwrite64", "preadv", "pwritev")),
    ("epoll (waiting for sockets)", ("epoll_wait", "epoll_pwait", "epoll_ctl")),
    ("switching threads on the way back from a call", ("exit_to_user_mode_loop",)),
]


def syscall(frames):
    """The system call a kernel sample is in (None: not in one), from the frame under
    do_syscall_64: `__x64_sys_fdatasync`, `ksys_read` or `do_writev` name their call."""
    for i, f in enumerate(frames):
        if f == "do_syscall_64_[k]":
            for g in frames[i + 1:]:
                name = g.removesuffix("_[k]")
                if name not in ("x64_sys_call", "syscall_exit_to_user_mode"):
                    return SYSCALL_PREFIX.sub("", name)
            return None
    return None


def owner(frames):
    """What a sample was doing, by its frames (the leaf last)."""
    leaf = frames[-1]
    if leaf.endswith("_[k]"):
        call = syscall(frames)
        if call is None:
            return "kernel: page faults, interrupts"
        for name, names in SYSCALLS:
            if call in names:
                return f"kernel: {name}"
        return "kernel: other system calls"
    for name, pat in OWNERS:
        if pat.search(leaf):
            return name
    return "other user code"


def fio_write(mnt):
    d = mnt / "fio"
    d.mkdir(exist_ok=True)
    compare.fio(d, "seq", "write", "1M", "1G")


def fio_read(mnt):
    compare.fio(mnt / "fio", "seq", "read", "1M", "1G")


def creates(mnt, files=4000):
    def stream(i):
        d = mnt / f"creates{i}"
        d.mkdir()
        for j in range(files):
            os.close(os.open(d / f"f{j}", os.O_CREAT | os.O_WRONLY, 0o644))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def tree(mnt, tarball):
    d = mnt / "tree-x"
    d.mkdir()
    compare.run(["tar", "-xf", str(tarball), "-C", str(d)])
    compare.run(["sync", "-f", str(d)])


def record(name, work, fn):
    """Runs fn under `perf record -a` and returns (seconds, folded stacks of every sample)."""
    data = work / f"{name}.perf"
    ctl, ack = work / "perf-ctl", work / "perf-ack"
    for f in (ctl, ack):
        f.unlink(missing_ok=True)
        os.mkfifo(f)
    # Started with sampling off, and switched on through its control fifo once it is ready, so
    # that the samples cover the workload and nothing before it.
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", str(FREQ), "--call-graph",
         f"dwarf,{STACK}", "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", str(data)],
        stderr=subprocess.DEVNULL)
    with open(ctl, "w") as c, open(ack) as a:
        c.write("enable\n")
        c.flush()
        a.readline()
    t = time.monotonic()
    fn()
    took = time.monotonic() - t
    perf.send_signal(signal.SIGINT)
    perf.wait(120)
    compare.log(f"{name}: {took:.1f} s; unwinding the stacks")
    script = subprocess.Popen(["perf", "script", "-i", str(data), "--no-inline", "-F",
                               "comm,pid,tid,cpu,time,period,event,ip,sym,dso"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    folded = subprocess.run(["inferno-collapse-perf", "--all", "--pid"], stdin=script.stdout,
                            capture_output=True, text=True, check=True).stdout
    script.wait()
    data.unlink()
    return took, [l for l in folded.splitlines() if l.strip()]


def split(folded, pid):
    """Shares of the samples: idle, the other processes, and by owner within process `pid`;
    and that process's samples by thread name (with inferno's --pid, a stack's first frame
    is its thread's name and its process's id)."""
    shares, threads = collections.Counter(), collections.Counter()
    total = 0
    for line in folded:
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        frames = stack.split(";")
        comm, _, of = frames[0].rpartition("-")
        if comm == "swapper":
            shares["idle"] += n
        elif of != str(pid):
            shares[f"other processes ({comm})"] += n
        else:
            shares[f"sealfs up: {owner(frames)}"] += n
            threads[comm] += n
    return total, shares, threads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sealfs", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True, help="the folder for NAME.svg; profiles.md beside it")
    ap.add_argument("--only", help="comma-separated workloads (write,read,creates,tree)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("profile: run as root (FUSE mounts, perf -a, dropping the caches)")
    work = Path(a.work).resolve()
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tarball, entries = compare.source_tarball(work)
    up = compare.Up(a.sealfs, work)
    mnt = up.mnt
    workloads = [
        ("write", "fio sequential write, 1 GiB in 1 MiB blocks, fsync at the end",
         lambda: fio_write(mnt)),
        ("read", "fio sequential read of that 1 GiB, cold (caches dropped before)",
         lambda: fio_read(mnt)),
        ("creates", "8,000 empty files made by 2 threads, a folder each", lambda: creates(mnt)),
        ("tree", f"tar extraction of a source tree of {entries} entries, then sync",
         lambda: tree(mnt, tarball)),
    ]
    only = set(a.only.split(",")) if a.only else None
    results = []
    try:
        for name, what, fn in workloads:
            if only and name not in only:
                if name == "write" and "read" in only:
                    fn()  # the read's file, written unprofiled
                continue
            if name == "read":
                compare.drop_caches()
            took, folded = record(name, work, fn)
            (work / f"{name}.folded").write_text("\n".join(folded) + "\n")
            svg = out / f"{name}.svg"
            with open(svg, "w") as f:
                subprocess.run(["inferno-flamegraph", "--title", f"sealfs up: {what}",
                                "--width", "1400", str(work / f"{name}.folded")], stdout=f,
                               check=True)
            total, shares, threads = split(folded, up.proc.pid)
            results.append((name, what, took, total, shares, threads))
            compare.log(f"{name}: flame graph in {svg}")
    finally:
        up.stop()
    report(out.parent / "profiles.md", out, results)


def report(path, out, results):
    rel = out.name
    lines = [
        "# Profiles of `sealfs up`",
        "",
        "Produced by `bench/profile` (this file is its output): `perf record -a -e cpu-clock "
        f"-F {FREQ} --call-graph dwarf` over the whole machine while one workload runs on the "
        "mount of a fresh `sealfs up`, folded and drawn with inferno.",
        "",
        f"- **Machine:** {compare.machine()}.",
        f"- **Version:** sealfs {compare.git_rev()}.",
        "- A sample is counted where it was running (self time): `idle` is a core with nothing "
        "to run; `kernel` is system calls, page cache, FUSE, loopback TCP, futexes and the "
        "disk; the rest is the `sealfs up` process by the crate of its running frame, or the "
        "process driving the workload (fio, tar, python3).",
        "",
    ]
    for name, what, took, total, shares, by_thread in results:
        lines += [f"## {name}: {what}", "",
                  f"{took:.1f} s; {total / 1e9:.1f} s of the cores' time sampled (2 cores, "
                  "the workload from start to end). Flame graph: "
                  f"[{rel}/{name}.svg]({rel}/{name}.svg).", "",
                  "| where | share of samples |", "|---|---:|"]
        for k, v in shares.most_common():
            if v * 1000 >= total:
                lines.append(f"| {k} | {100 * v / total:.1f}% |")
        own = sum(by_thread.values())
        if own:
            lines += ["", "The `sealfs up` process by thread: " + ", ".join(
                f"{t} {100 * v / own:.0f}%" for t, v in by_thread.most_common(6)) + ".", ""]
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
