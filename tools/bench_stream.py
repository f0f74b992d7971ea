#!/usr/bin/env python3
"""Large decodes side by side: libklvae untiled, exact streamed (memory_limit)
and blend-tiled, against diffusers' tiled decode (enable_tiling) in PyTorch,
on the same random SD weights and the same latent, in the same run.

For each size every case runs in a fresh process (its peak RSS is its own);
the cases alternate within each round, and each reports the median time of
its rounds. Errors are max abs and relative L2 against libklvae's untiled
decode (which agrees with diffusers' untiled decode within 1e-4:
docs/design.md). PyTorch is optional: without it those cases are skipped.

    python3 tools/bench_stream.py [--sizes 1024 2048] [--runs 3] [--big-runs 1]
        [--limits 1024=1G+2G,2048=3G+5G] [--threads 2] [--work DIR]
        [--torch-untiled 1024] [--only untiled,exact-1G,...] [--lock FILE]

--limits gives the memory_limit values per size (one exact case each); --big-runs is the rounds of sizes over
1024; --torch-untiled the largest size at which PyTorch also decodes untiled;
--lock runs each case under flock FILE (a machine shared with other benchmarks:
no two timings overlap, and the wait is not timed).
Results: a markdown table on stdout, every run in DIR/results.json (and each
run's line as it ends in DIR/runs.jsonl).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "build", "bench_stream")


def run(cmd, lock=None):
    if lock:
        cmd = ["flock", lock] + cmd
    sys.stderr.write("+ " + " ".join(cmd) + "\n")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def errors(path, ref_path):
    import numpy as np
    a, r = np.fromfile(path, dtype=np.float32), np.fromfile(ref_path, dtype=np.float32)
    d = a.astype(np.float64) - r
    return float(np.abs(d).max()), float(np.linalg.norm(d) / np.linalg.norm(r))


def cases(size, limit, work, threads, torch_untiled):
    z, model = os.path.join(work, f"z{size}.raw"), os.path.join(work, "sd")
    common = ["--model", model, "--input", z, "--threads", str(threads)]
    out = lambda name: os.path.join(work, f"out{size}_{name}.raw")
    c = {"untiled": [BENCH, "decode", str(size), *common, "--memory-limit", "none"]}
    for lim in limit.split("+"):
        c["exact-" + lim] = [BENCH, "decode", str(size), *common, "--memory-limit", lim,
                             "--spill-dir", work]
    c["blend"] = [BENCH, "decode", str(size), *common, "--tiling", "blend"]
    c["torch-tiled"] = [sys.executable, os.path.join(ROOT, "tools", "bench_stream_torch.py"),
                        model, str(size), "--input", z, "--tiled", "--threads", str(threads)]
    if size <= torch_untiled:
        c["torch-untiled"] = c["torch-tiled"][:-3] + ["--threads", str(threads)]
    return {name: cmd + ["--output", out(name)] for name, cmd in c.items()}, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--big-runs", type=int, default=1)
    p.add_argument("--limits", default="1024=1G+2G,2048=3G+5G")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "build", "bench_stream_work"))
    p.add_argument("--torch-untiled", type=int, default=1024)
    p.add_argument("--only", default="")
    p.add_argument("--lock", default="")
    a = p.parse_args()
    import numpy as np
    limits = dict(item.split("=") for item in a.limits.split(","))
    os.makedirs(a.work, exist_ok=True)
    if not os.path.isdir(os.path.join(a.work, "sd")):
        subprocess.run([BENCH, "save-model", os.path.join(a.work, "sd")], check=True)
    have_torch = subprocess.run([sys.executable, "-c", "import torch, diffusers"],
                                capture_output=True).returncode == 0
    results = []
    for size in a.sizes:
        z = os.path.join(a.work, f"z{size}.raw")
        np.random.default_rng(size).standard_normal((1, 4, size // 8, size // 8),
                                                    dtype=np.float32).tofile(z)
        todo, out = cases(size, limits.get(str(size), "auto"), a.work, a.threads,
                          a.torch_untiled)
        if a.only:
            todo = {k: v for k, v in todo.items() if k in a.only.split(",") or k == "untiled"}
        if not have_torch:
            todo = {k: v for k, v in todo.items() if not k.startswith("torch")}
        rounds = a.runs if size <= 1024 else a.big_runs
        runs = {name: [] for name in todo}
        for r in range(rounds):
            order = list(todo) if r % 2 == 0 else list(reversed(todo))
            for name in order:
                res = run(todo[name], a.lock)
                if res:
                    runs[name].append(res)
                    with open(os.path.join(a.work, "runs.jsonl"), "a") as fp:
                        fp.write(json.dumps({"size": size, "case": name, **res}) + "\n")
        for name, rs in runs.items():
            if not rs:
                continue
            times = sorted(t for res in rs for t in res["times"])
            n = len(times)
            median = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
            err = errors(out(name), out("untiled")) if os.path.exists(out("untiled")) else (None, None)
            results.append({"size": size, "case": name, "times": times, "median": median,
                            "peak_rss_mb": max(res["peak_rss_mb"] for res in rs),
                            "max_abs": err[0], "rel_l2": err[1],
                            "plan": rs[-1].get("plan", ""), "tile": rs[-1].get("tile")})
    with open(os.path.join(a.work, "results.json"), "w") as fp:
        json.dump(results, fp, indent=1)
    print("| size | case | median (s) | vs untiled | peak RSS (MB) | max abs err | rel L2 err |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        base = [x for x in results if x["size"] == res["size"] and x["case"] == "untiled"]
        ratio = res["median"] / base[0]["median"] if base else float("nan")
        print(f"| {res['size']}² | {res['case']} | {res['median']:.1f} | {ratio:.2f} | "
              f"{res['peak_rss_mb']:.0f} | {res['max_abs']:.2e} | {res['rel_l2']:.2e} |")
    for res in results:
        if res["plan"]:
            print(f"- {res['size']}² {res['case']}: {res['plan']}")


if __name__ == "__main__":
    main()
