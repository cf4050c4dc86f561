"""Run every benchmark on this machine and print the ratios against the baselines measured in the same run.

    python bench/run_all.py --tag h200                 # one GPU: generation, validation, DPO (TRL vs capdpo)
    python bench/run_all.py --tag h200x2 --multi-gpu   # two GPUs: the same code on 1 GPU vs on all of them
    python bench/run_all.py --tiny --out-dir /tmp/b    # CPU smoke test of the whole runner

Each benchmark writes its JSON to `--out-dir` (default bench/results/, with the GPU named in the file name);
this script reads them back and prints one table: baseline, capdpo, ratio, target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# NVLink multicast can take shared GPUs out of service: keep it off in every process this starts.
for _key, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_key, _value)


def run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    print(f"  -> exit {proc.returncode}", flush=True)
    return proc.returncode


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _percent(result: dict, key: str) -> str:
    value = result.get(key)
    return f"{value:.0%}" if isinstance(value, (int, float)) else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="gpu", help="names the device in the result files, e.g. h200")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--multi-gpu", action="store_true", help="compare 1 GPU with all visible GPUs")
    parser.add_argument("--only", nargs="+", choices=["generate", "validate", "train"], default=None)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"run_all_{args.tag}.log"
    py = sys.executable
    tiny = ["--tiny"] if args.tiny else []
    only = set(args.only or ["generate", "validate", "train"])
    rows = [("work", "baseline", "capdpo", "ratio", "target")]

    if not args.multi_gpu:
        if "generate" in only:
            f = out / f"generate_{args.tag}.json"
            # capdpo from 512 up: batch 2048 ran out of memory on an 80 GB H100 (2026-12-05), so smaller batches are timed too
            sizes = (
                ["--baseline-batches", "64", "256", "512", "--batches", "512", "1024", "2048"] if not args.tiny else []
            )
            run([py, "bench/generate.py", *tiny, *sizes, "--out", str(f)], log)
            r = load(f)
            if r and "speedup" in r:
                best = max(r["capdpo"], key=lambda e: e["images_per_s"])
                rows.append(("captioning 7B, images/s", f"{r['baseline']['images_per_s']:.1f} (batch {r['baseline']['batch']})",
                             f"{best['images_per_s']:.1f} (batch {best['batch']})", f"{r['speedup']:.2f}x", ""))  # fmt: skip
                top = r["best_baseline"]
                rows.append(("  vs generate at its best batch", f"{top['images_per_s']:.1f} (batch {top['batch']})",
                             "", f"{r['speedup_vs_best_baseline']:.2f}x", ">= 4x"))  # fmt: skip
                rows.append(("  share of physical floor", "", f"{r['share_of_floor']:.0%}", "", ">= 80%"))
                sustained = r.get("share_of_floor_sustained")
                if sustained is not None and sustained == sustained:  # measured (not NaN)
                    rows.append(("  at the MLP GEMM's sustained rate", "", f"{sustained:.0%}", "", ""))
        if "validate" in only:
            f = out / f"validate_{args.tag}.json"
            # 64 images and 640 suffixes per pass: the settings the README reports (16 images leave fixed costs)
            sizes = [] if args.tiny else ["--images", "64", "--batch", "640"]
            run([py, "bench/validate.py", *tiny, *sizes, "--out", str(f)], log)
            r = load(f)
            if r and "speedup" in r:
                rows.append(("validation 3B, candidates/s", f"{r['baseline']['candidates_per_s']:.1f}",
                             f"{r['capdpo_shared_prefix']['candidates_per_s']:.1f}", f"{r['speedup']:.1f}x", ">= 40x"))  # fmt: skip
                if "share_of_floor" in r:
                    rows.append(("  share of floor (measured matmul rate)", "", f"{r['share_of_floor']:.0%}", "",
                                 ">= 50%"))  # fmt: skip
        if "train" in only:
            fb, fo = out / f"train_{args.tag}_trl.json", out / f"train_{args.tag}_capdpo.json"
            fn = out / f"train_{args.tag}_capdpo_nogc.json"
            fp = out / f"train_{args.tag}_capdpo_plain_kernels.json"
            # one process through the launcher, as users run it (DeepSpeed expects a launcher's environment)
            launch = [] if args.tiny else ["accelerate", "launch", "--config_file", "configs/accelerate/zero2.yaml",
                                           "--num_processes", "1"]  # fmt: skip
            launch = launch or [py]
            run([*launch, "bench/train_gpu.py", *tiny, "--baseline", "--out", str(fb)], log)
            run([*launch, "bench/train_gpu.py", *tiny, "--out", str(fo)], log)
            run([*launch, "bench/train_gpu.py", *tiny, "--no-fused-kernels", "--out", str(fp)], log)
            run([*launch, "bench/train_gpu.py", *tiny, "--no-gradient-checkpointing", "--out", str(fn)], log)
            b, o, n, k = load(fb), load(fo), load(fn), load(fp)
            if b and o:
                rows.append(("DPO 7B LoRA, pairs/s", f"{b['pairs_per_second']:.2f}", f"{o['pairs_per_second']:.2f}",
                             f"{o['pairs_per_second'] / b['pairs_per_second']:.2f}x", ">= 10x"))  # fmt: skip
                rows.append(("  peak memory, GiB", f"{b['peak_memory_gib']:.1f}", f"{o['peak_memory_gib']:.1f}",
                             f"{o['peak_memory_gib'] / max(b['peak_memory_gib'], 1e-9):.2f}x", "<= 1x"))  # fmt: skip
                rows.append(("  MFU / share of floor", "", _percent(o, "mfu") + " / " + _percent(o, "share_of_floor"),
                             "", ""))  # fmt: skip
            if b and k:
                rows.append(("DPO, fused kernels off, pairs/s", f"{b['pairs_per_second']:.2f}",
                             f"{k['pairs_per_second']:.2f}", f"{k['pairs_per_second'] / b['pairs_per_second']:.2f}x",
                             ""))  # fmt: skip
            if b and n:
                rows.append(("DPO, recomputation off, pairs/s", f"{b['pairs_per_second']:.2f}",
                             f"{n['pairs_per_second']:.2f}", f"{n['pairs_per_second'] / b['pairs_per_second']:.2f}x",
                             ""))  # fmt: skip
                rows.append(("  peak memory, GiB", f"{b['peak_memory_gib']:.1f}", f"{n['peak_memory_gib']:.1f}",
                             f"{n['peak_memory_gib'] / max(b['peak_memory_gib'], 1e-9):.2f}x", ""))  # fmt: skip
                rows.append(("  MFU / share of floor", "", _percent(n, "mfu") + " / " + _percent(n, "share_of_floor"),
                             "", ""))  # fmt: skip
    else:
        import torch

        n = torch.cuda.device_count()
        if "generate" in only:
            f1, fn = out / f"generate_{args.tag}_1gpu.json", out / f"generate_{args.tag}_{n}gpu.json"
            common = [*tiny, "--skip-baseline", "--batches", "512" if not args.tiny else "8", "--images", "1024"]
            run([py, "bench/generate.py", *common, "--out", str(f1)], log, {"CUDA_VISIBLE_DEVICES": "0"})
            run(["torchrun", f"--nproc_per_node={n}", "bench/generate.py", *common, "--out", str(fn)], log)
            a, b = load(f1), load(fn)
            if a and b:
                x, y = a["capdpo"][0]["images_per_s"], b["capdpo"][0]["images_per_s"]
                rows.append(
                    (f"captioning 7B, 1 vs {n} GPUs, images/s", f"{x:.1f}", f"{y:.1f}", f"{y / x:.2f}x", ">= 1.8x")
                )
        if "train" in only:
            f1, fn = out / f"train_{args.tag}_1gpu.json", out / f"train_{args.tag}_{n}gpu.json"
            launch = ["accelerate", "launch", "--config_file", "configs/accelerate/zero2.yaml"]
            for procs, f in ((1, f1), (n, fn)):  # a fresh folder per launch, shared by its processes
                work = ["--work-dir", tempfile.mkdtemp(prefix="capdpo-bench-")]
                run([*launch, "--num_processes", str(procs), "bench/train_gpu.py", *tiny, *work, "--out", str(f)], log)
            a, b = load(f1), load(fn)
            if a and b:
                x, y = a["pairs_per_second"], b["pairs_per_second"]
                rows.append(
                    (f"DPO 7B ZeRO-2, 1 vs {n} GPUs, pairs/s", f"{x:.2f}", f"{y:.2f}", f"{y / x:.2f}x", ">= 1.8x")
                )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    (out / f"summary_{args.tag}.txt").write_text("\n".join(" | ".join(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
