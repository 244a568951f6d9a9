"""python -m bench: Loom's benchmarks, measured against the machine's own limits.

For every workload a fresh Loom (``twistd -n loom``) runs on loopback with a
fresh data directory; a compiled load generator (bench/loadgen.c, built with
gcc on the fly) drives it. The same run measures raw loopback TCP and file
appends on the data directory's file system, and Loom's figures are given as
ratios to those. Every figure is the median of repeated runs. Server CPU
seconds and peak RSS come from /proc.

    python -m bench                   # everything (about 5 minutes on 2 cores)
    python -m bench --only W1,W6      # some workloads
    python -m bench --quick           # shorter runs, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GiB, MiB = 1024**3, 1024**2
TICKS = os.sysconf("SC_CLK_TCK")


def build_loadgen(build_dir: Path) -> Path:
    """Compile bench/loadgen.c once per run (gcc -O2)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / "loadgen"
    source = HERE / "loadgen.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def loadgen(binary: Path, *args, on_phase=None) -> dict:
    """Run the load generator; ``on_phase(name)`` hears its "phase: ..." announcements."""
    process = subprocess.Popen([str(binary), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    errors = []
    for line in process.stderr:
        if line.startswith("phase: ") and on_phase is not None:
            on_phase(line.split(":", 1)[1].strip())
        else:
            errors.append(line)
    out = process.stdout.read()
    if process.wait(timeout=900) != 0:
        raise RuntimeError(f"loadgen {' '.join(map(str, args))} failed: {''.join(errors).strip()}")
    return json.loads(out)


class Server:
    """A fresh ``twistd -n loom`` on an ephemeral loopback port."""

    def __init__(self, data_dir: Path, *options: str):
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env = {k: v for k, v in env.items() if not k.startswith("LOOM_")}
        # Every load comes from one address here: W2's thousand followers and their
        # producer would exceed the default share of one client.
        env["LOOM_MAX_CONNECTIONS_PER_CLIENT"] = "0"
        self.log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "loom", "--data-dir", str(data_dir),
             "--listen", "tcp:0:interface=127.0.0.1", *options],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(data_dir.parent),
        )
        self.port = self._wait_ready()

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = re.search(r"Loom ready: .* listening on .*:(\d+)", text)
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{text[-2000:]}")
            time.sleep(0.005)
        raise RuntimeError("the server did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def status(self, field: str) -> int:
        """A /proc status figure in KiB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="loom-bench-", dir=args.dir))
        self.binary = build_loadgen(self.work / "build")
        self.results: dict = {"machine": machine(), "settings": vars(args).copy()}
        self.repeat = args.repeat

    def fresh_dir(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def server(self, name: str, *options: str) -> Server:
        data = self.fresh_dir(name)
        data.mkdir(parents=True)
        return Server(data, *options)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # --- the machine's limits ---

    def limits(self) -> dict:
        size = self.args.bulk_bytes
        loop, append = [], []
        for _ in range(self.repeat):
            loop.append(loadgen(self.binary, "loopback", size)["mib_per_s"])
            append.append(loadgen(self.binary, "append", self.work / "append.tmp", size))
        figures = {
            "loopback_mib_s": median(loop),
            "append_mib_s": median(a["mib_per_s"] for a in append),
            "append_fsync_mib_s": median(a["with_fsync_mib_per_s"] for a in append),
            "runs": {"loopback": loop, "append": append},
        }
        self.say(f"limits: loopback {figures['loopback_mib_s']:.0f} MiB/s, file append "
                 f"{figures['append_mib_s']:.0f} MiB/s ({figures['append_fsync_mib_s']:.0f} "
                 "with fsync)")
        return figures

    # --- workloads ---

    def w1(self) -> dict:
        size = self.args.bulk_bytes
        runs = []
        for index in range(self.repeat):
            loop = loadgen(self.binary, "loopback", size)["mib_per_s"]
            server = self.server(f"w1-{index}")
            try:
                cpu0 = server.cpu_seconds()
                bulk = loadgen(self.binary, "bulk", server.port, "bulk", size)
                cpu1 = server.cpu_seconds()
                replay = loadgen(self.binary, "replay", server.port, "bulk")
                cpu2 = server.cpu_seconds()
                runs.append({
                    "loopback_mib_s": loop,
                    "ingest_mib_s": bulk["ingest_mib_per_s"],
                    "live_mib_s": bulk["follower_mib_per_s"],
                    "replay_mib_s": replay["mib_per_s"],
                    "ingest_ratio": bulk["ingest_mib_per_s"] / loop,
                    "live_ratio": bulk["follower_mib_per_s"] / loop,
                    "replay_ratio": replay["mib_per_s"] / loop,
                    "server_cpu_s_bulk": cpu1 - cpu0,
                    "server_cpu_s_replay": cpu2 - cpu1,
                    "loadgen_cpu_s_bulk": bulk["loadgen_cpu_s"],
                    "loadgen_cpu_s_replay": replay["loadgen_cpu_s"],
                    "server_peak_rss_mib": server.status("VmHWM") / 1024,
                })
            finally:
                server.stop()
                self.fresh_dir(f"w1-{index}")
        figures = summarize(runs)
        figures["targets"] = {
            "ingest_ratio >= 0.5": figures["ingest_ratio"] >= 0.5,
            "live_ratio >= 0.5": figures["live_ratio"] >= 0.5,
            "replay_ratio >= 0.8": figures["replay_ratio"] >= 0.8,
        }
        self.say(f"W1: ingest {figures['ingest_ratio']:.0%}, live {figures['live_ratio']:.0%}, "
                 f"replay {figures['replay_ratio']:.0%} of loopback")
        return figures

    def lines(self, name: str, producers: int, followers: int, interval_ms: int) -> dict:
        runs = []
        for index in range(self.args.repeat_long):
            server = self.server(f"{name}-{index}")
            try:
                rss0 = server.status("VmRSS")
                marks = {}

                def phase(name, server=server, marks=marks):
                    marks[name] = server.cpu_seconds()

                result = loadgen(self.binary, "lines", server.port, producers, followers,
                                 interval_ms, self.args.seconds, 100, on_phase=phase)
                # Server CPU over the steady phase only: the lines, not the set-up.
                cpu = marks["end"] - marks["steady"]
                runs.append({
                    "deliveries": result["deliveries"],
                    "deliveries_expected": result["deliveries_expected"],
                    "delivered_fraction": result["deliveries"] / result["deliveries_expected"],
                    "p50_ms": result["latency"]["p50_ms"],
                    "p99_ms": result["latency"]["p99_ms"],
                    "p999_ms": result["latency"]["p999_ms"],
                    "max_ms": result["latency"]["max_ms"],
                    "server_cpu_s": cpu,
                    "loadgen_cpu_s": result["loadgen_cpu_s"],
                    "server_rss_mib": server.status("VmRSS") / 1024,
                    "server_peak_rss_mib": server.status("VmHWM") / 1024,
                    "server_rss_growth_mib": (server.status("VmHWM") - rss0) / 1024,
                })
            finally:
                server.stop()
                self.fresh_dir(f"{name}-{index}")
        return summarize(runs)

    def w2(self) -> dict:
        figures = {}
        for followers in self.args.fanout:
            result = self.lines(f"w2-{followers}", 1, followers, 5)
            # The machine's floor for the same fan-out: C sender, C receiver, no Loom.
            floors = [loadgen(self.binary, "fanout", followers, 5, self.args.seconds, 100)
                      for _ in range(self.args.repeat_long)]
            result["floor_p99_ms"] = median(f["latency"]["p99_ms"] for f in floors)
            result["p99_over_floor"] = result["p99_ms"] / result["floor_p99_ms"]
            figures[f"N={followers}"] = result
            self.say(f"W2 N={followers}: p99 {result['p99_ms']:.2f} ms (floor "
                     f"{result['floor_p99_ms']:.2f} ms), delivered "
                     f"{result['delivered_fraction']:.4%}")
        figures["targets"] = {
            "every follower receives every byte": all(
                v["delivered_fraction"] == 1.0 for k, v in figures.items() if k.startswith("N=")),
            "p99 <= 2 ms at N=100": figures.get("N=100", {}).get("p99_ms", 1e9) <= 2,
            "p99 <= 50 ms at N=1000": figures.get("N=1000", {}).get("p99_ms", 1e9) <= 50,
        }
        return figures

    def w3(self) -> dict:
        figures = self.lines("w3", 200, 1, 100)
        # Scale CPU to the workload's 20 s when a shorter run was asked for.
        cpu_per_20s = figures["server_cpu_s"] * 20 / self.args.seconds
        figures["server_cpu_s_per_20s"] = cpu_per_20s
        figures["targets"] = {
            "100% delivered": figures["delivered_fraction"] == 1.0,
            "p99 <= 5 ms": figures["p99_ms"] <= 5,
            "server CPU <= 2 s over 20 s": cpu_per_20s <= 2,
            "RSS <= 80 MB": figures["server_peak_rss_mib"] * MiB / 1e6 <= 80,
        }
        self.say(f"W3: p99 {figures['p99_ms']:.2f} ms, CPU {cpu_per_20s:.2f} s / 20 s, "
                 f"peak RSS {figures['server_peak_rss_mib']:.1f} MiB")
        return figures

    def w4(self) -> dict:
        size = self.args.slow_bytes
        runs = []
        for index in range(self.repeat):
            server = self.server(f"w4-{index}")
            try:
                rss0 = server.status("VmRSS")
                cpu0 = server.cpu_seconds()
                result = loadgen(self.binary, "slow", server.port, "slow", size, 1_000_000)
                runs.append({
                    "stored_seconds": result["ingest_seconds"],
                    "ingest_mib_s": result["ingest_mib_per_s"],
                    "follower_bytes_meanwhile": result["follower_bytes"],
                    "server_rss_growth_mib": (server.status("VmHWM") - rss0) / 1024,
                    "server_cpu_s": server.cpu_seconds() - cpu0,
                    "loadgen_cpu_s": result["loadgen_cpu_s"],
                })
            finally:
                server.stop()
                self.fresh_dir(f"w4-{index}")
        figures = summarize(runs)
        figures["targets"] = {
            f"{size // MiB} MiB stored in < 10 s": figures["stored_seconds"] < 10,
            "memory grows < 20 MiB": figures["server_rss_growth_mib"] < 20,
        }
        self.say(f"W4: {size // MiB} MiB stored in {figures['stored_seconds']:.2f} s, memory "
                 f"+{figures['server_rss_growth_mib']:.1f} MiB")
        return figures

    def w5(self) -> dict:
        from bench.populate import populate

        count = self.args.streams
        data = self.fresh_dir("w5")
        self.say(f"W5: writing {count} streams (once)...")
        started = time.monotonic()
        populate(str(data), count, size=200)
        populate_s = time.monotonic() - started
        runs = []
        for index in range(self.repeat):
            if index == self.repeat - 1:
                # The last start follows an unclean shutdown: the full reconciliation runs.
                import sqlite3

                with sqlite3.connect(data / "catalog.sqlite3") as db:
                    db.execute("INSERT OR REPLACE INTO settings VALUES ('clean_shutdown', '0')")
            started = time.monotonic()
            server = Server(data)
            ready = time.monotonic() - started
            url = f"http://127.0.0.1:{server.port}/stream/stored-{count // 2:07d}"
            urllib.request.urlopen(url).read()
            first = time.monotonic() - started
            try:
                result = loadgen(self.binary, "get", server.port, "stored", count,
                                 self.args.get_requests)
                runs.append({
                    "start_to_ready_s": ready,
                    "start_to_first_response_s": first,
                    "unclean": index == self.repeat - 1,
                    "get_p50_first_byte_ms": result["first_byte"]["p50_ms"],
                    "get_p99_first_byte_ms": result["first_byte"]["p99_ms"],
                    "get_p99_complete_ms": result["complete"]["p99_ms"],
                    "server_rss_mib": server.status("VmRSS") / 1024,
                })
            finally:
                server.stop()
        catalog_bytes = sum(f.stat().st_size for f in data.glob("catalog.sqlite3*"))
        figures = summarize(runs)
        figures.update({"streams": count, "catalog_bytes": catalog_bytes,
                        "catalog_bytes_per_stream": catalog_bytes / count,
                        "populate_s": populate_s,
                        "start_to_first_response_s_max": max(
                            r["start_to_first_response_s"] for r in runs)})
        figures["targets"] = {
            "start-up < 2 s": figures["start_to_first_response_s_max"] < 2,
            "p99 GET first byte < 5 ms": figures["get_p99_first_byte_ms"] < 5,
        }
        self.say(f"W5: start {figures['start_to_first_response_s_max']:.2f} s (worst), GET p99 "
                 f"first byte {figures['get_p99_first_byte_ms']:.2f} ms, catalog "
                 f"{catalog_bytes / MiB:.1f} MiB")
        shutil.rmtree(data, ignore_errors=True)
        return figures

    def w6(self) -> dict:
        """A follower's delivery while listings with metadata filters run in a loop over a
        large catalog (from another process): pages of 100, then of 1,000."""
        from bench.listing_load import follow_latency, percentile
        from bench.populate import branch_metadata, populate

        count = self.args.listing_streams
        data = self.fresh_dir("w6")
        self.say(f"W6: writing a catalog of {count} streams (once)...")
        populate(str(data), count, size=0, files=False, metadata=branch_metadata(50))
        queries = ["/streams?meta.branch=main", "/streams?meta.branch=feature-7",
                   "/streams?meta.job=job-1234&meta.branch=main",
                   "/streams?state=complete&meta.branch=main"]
        seconds = 2.0 if self.args.quick else 5.0
        figures: dict = {"streams": count}
        server = Server(data)
        try:
            quiet = follow_latency(server.port, "quiet", seconds)
            figures["idle"] = {"p50_ms": percentile(quiet, .5) * 1000,
                               "p99_ms": percentile(quiet, .99) * 1000}
            for page in (100, 1000):
                paged = [f"{q}&limit={page}" for q in queries]
                hammer = subprocess.Popen(
                    [sys.executable, "-u", "-m", "bench.listing_load", "hammer",
                     str(server.port), *paged],
                    stdout=subprocess.PIPE, cwd=str(REPO), env=dict(os.environ,
                                                                    PYTHONPATH=str(REPO)))
                try:
                    hammer.stdout.readline()  # ten listings answered: the load is on
                    started = time.monotonic()
                    latencies = follow_latency(server.port, f"loaded-{page}", seconds)
                    elapsed = time.monotonic() - started
                finally:
                    hammer.kill()
                    told = hammer.stdout.read().decode().count(" listings")
                    hammer.wait()
                figures[f"page={page}"] = {
                    "p50_ms": percentile(latencies, .5) * 1000,
                    "p99_ms": percentile(latencies, .99) * 1000,
                    "max_ms": max(latencies) * 1000,
                    "listings_per_s": told * 10 / elapsed,
                }
            figures["server_cpu_s"] = server.cpu_seconds()
        finally:
            server.stop()
        worst = max(figures[f"page={page}"]["p99_ms"] for page in (100, 1000))
        figures["targets"] = {"follower p99 < 5 ms under listing load": worst < 5}
        self.say(f"W6: follower p99 {figures['idle']['p99_ms']:.2f} ms idle, "
                 f"{figures['page=100']['p99_ms']:.2f} ms (pages of 100), "
                 f"{figures['page=1000']['p99_ms']:.2f} ms (pages of 1000)")
        shutil.rmtree(data, ignore_errors=True)
        return figures

    def run(self) -> dict:
        started = time.monotonic()
        self.results["limits"] = self.limits()
        workloads = {"W1": self.w1, "W2": self.w2, "W3": self.w3, "W4": self.w4, "W5": self.w5,
                     "W6": self.w6}
        for name in self.args.only:
            self.results[name] = workloads[name]()
        self.results["seconds"] = time.monotonic() - started
        shutil.rmtree(self.work, ignore_errors=True)
        return self.results


def summarize(runs: list[dict]) -> dict:
    """The median of every numeric figure over the runs, and the runs themselves."""
    figures = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            figures[key] = median(values)
    figures["runs"] = runs
    return figures


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0],
            "kernel": os.uname().release, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def table(results: dict) -> str:
    limits = results["limits"]
    rows = [("limit: raw loopback TCP, 64 KiB writes", f"{limits['loopback_mib_s']:.0f} MiB/s", ""),
            ("limit: file append on the data dir's fs", f"{limits['append_mib_s']:.0f} MiB/s",
             f"{limits['append_fsync_mib_s']:.0f} MiB/s with fsync")]

    def mark(ok):
        return "ok" if ok else "MISSED"

    if "W1" in results:
        w = results["W1"]
        rows += [
            ("W1 ingest (1 GiB, 64 KiB writes)", f"{w['ingest_mib_s']:.0f} MiB/s",
             f"{w['ingest_ratio']:.0%} of loopback (target 50%) {mark(w['ingest_ratio'] >= .5)}"),
            ("W1 live delivery", f"{w['live_mib_s']:.0f} MiB/s",
             f"{w['live_ratio']:.0%} of loopback (target 50%) {mark(w['live_ratio'] >= .5)}"),
            ("W1 replay", f"{w['replay_mib_s']:.0f} MiB/s",
             f"{w['replay_ratio']:.0%} of loopback (target 80%) {mark(w['replay_ratio'] >= .8)}"),
            ("W1 server CPU / peak RSS", f"{w['server_cpu_s_bulk']:.2f} s",
             f"{w['server_peak_rss_mib']:.0f} MiB; load generator {w['loadgen_cpu_s_bulk']:.2f} s"),
        ]
    if "W2" in results:
        for key, w in results["W2"].items():
            if not key.startswith("N="):
                continue
            target = {"N=100": 2, "N=1000": 50}.get(key)
            note = f"target {target} ms {mark(w['p99_ms'] <= target)}" if target else ""
            rows.append((f"W2 fan-out {key}: p99 latency", f"{w['p99_ms']:.2f} ms",
                         f"{note + '; ' if note else ''}{w['p99_over_floor']:.1f}x the C floor "
                         f"({w['floor_p99_ms']:.2f} ms); delivered "
                         f"{w['delivered_fraction']:.2%}; server CPU {w['server_cpu_s']:.1f} s, "
                         f"load generator {w['loadgen_cpu_s']:.1f} s"))
    if "W3" in results:
        w = results["W3"]
        rows += [
            ("W3 200 producers: p99 latency", f"{w['p99_ms']:.2f} ms",
             f"target 5 ms {mark(w['p99_ms'] <= 5)}; delivered {w['delivered_fraction']:.2%}"),
            ("W3 server CPU over 20 s", f"{w['server_cpu_s_per_20s']:.2f} s",
             f"target 2 s {mark(w['server_cpu_s_per_20s'] <= 2)}; load generator "
             f"{w['loadgen_cpu_s']:.2f} s"),
            ("W3 server peak RSS", f"{w['server_peak_rss_mib'] * MiB / 1e6:.0f} MB",
             f"target 80 MB {mark(w['server_peak_rss_mib'] * MiB / 1e6 <= 80)}"),
        ]
    if "W4" in results:
        w = results["W4"]
        rows += [
            ("W4 512 MiB stored (reader at 1 MB/s)", f"{w['stored_seconds']:.2f} s",
             f"target 10 s {mark(w['stored_seconds'] < 10)}; {w['ingest_mib_s']:.0f} MiB/s"),
            ("W4 server memory growth", f"{w['server_rss_growth_mib']:.1f} MiB",
             f"target 20 MiB {mark(w['server_rss_growth_mib'] < 20)}"),
        ]
    if "W5" in results:
        w = results["W5"]
        rows += [
            (f"W5 start-up, {w['streams']} streams", f"{w['start_to_first_response_s_max']:.2f} s",
             f"to the first answer, worst of {len(w['runs'])} (one unclean); target 2 s "
             f"{mark(w['start_to_first_response_s_max'] < 2)}"),
            ("W5 GET first byte p99", f"{w['get_p99_first_byte_ms']:.2f} ms",
             f"target 5 ms {mark(w['get_p99_first_byte_ms'] < 5)}; p50 "
             f"{w['get_p50_first_byte_ms']:.2f} ms"),
            ("W5 catalog size", f"{w['catalog_bytes'] / MiB:.1f} MiB",
             f"{w['catalog_bytes_per_stream']:.0f} bytes per stream"),
        ]
    if "W6" in results:
        w = results["W6"]
        for page in (100, 1000):
            f = w[f"page={page}"]
            rows.append((f"W6 follower p99, listings of {page} running", f"{f['p99_ms']:.2f} ms",
                         f"target 5 ms {mark(f['p99_ms'] < 5)}; {w['streams']} streams, "
                         f"{f['listings_per_s']:.0f} listings/s; idle p99 "
                         f"{w['idle']['p99_ms']:.2f} ms"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>12}  {c}" for a, b, c in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="W1,W2,W3,W4,W5,W6",
                        help="workloads to run, comma-separated (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per short figure (median)")
    parser.add_argument("--repeat-long", type=int, default=1,
                        help="runs per 20-second workload (W2, W3)")
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs")
    parser.add_argument("--dir", default=None, help="where data directories go (default: temp)")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/<time>.json)")
    args = parser.parse_args(argv)
    args.only = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    args.bulk_bytes = 256 * MiB if args.quick else GiB
    args.slow_bytes = 128 * MiB if args.quick else 512 * MiB
    args.seconds = 5 if args.quick else 20
    args.fanout = [1, 100, 1000]
    args.streams = 10_000 if args.quick else 100_000
    args.listing_streams = 30_000 if args.quick else 300_000
    args.get_requests = 500 if args.quick else 2000
    sys.path.insert(0, str(REPO))
    results = Bench(args).run()
    out = Path(args.out) if args.out else HERE / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n{results['seconds']:.0f} s; full figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
