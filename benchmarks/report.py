"""Results on disk: one JSON line per measurement in `<bench>.jsonl`, and a Markdown summary of the run.

JSONL files are appended to (a history across runs; each line carries its run id); `summary.md` is
rewritten for the latest run. The summary checks the issue's targets and says PASS / FAIL / n/a.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

# The reference model code on the 2-core development CPU (spec "Throughput anchors" and issue 2): fp32 img/s
# of vit_small (3.8-4.2; the top is used, the strictest bar) and vit_base.
REFERENCE_FP32_IMG_S = {"vit_small": 4.2, "vit_base": 1.13}
REFERENCE_INPUT_IMG_S_PER_CORE = 153.0
IMAGENET_TRAIN = 1_281_167
TARGETS = {
    "cpu_fp32_fraction_of_matmul": 0.90,
    "cpu_bf16_vs_fp32": 2.0,
    "input_speedup": 3.0,
    "gpu_mfu": 0.40,
    "gpu_300_epoch_hours_8gpu": 5.0,
}


def write_jsonl(out_dir: Path, records: list[dict], run_id: str) -> list[Path]:
    """Append each record to `<out_dir>/<record["bench"]>.jsonl`; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_bench[record["bench"]].append({"run_id": run_id, **record})
    paths = []
    for bench, rows in by_bench.items():
        path = out_dir / f"{bench}.jsonl"
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=True) + "\n")
        paths.append(path)
    return paths


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "FAIL"


def _errors(records: list[dict]) -> list[str]:
    return [f"- `{r.get('case', r['bench'])}` ({r['bench']}): {r['error']}" for r in records if "error" in r]


def _machine_section(machine: dict, command: str, run_id: str) -> list[str]:
    pk = machine["packages"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in machine["cuda_devices"]) or "none"
    return [
        f"# Benchmark summary ({run_id})",
        "",
        f"Command: `{command}`",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['usable_cores']} usable cores of {machine['cpu_count']}, "
        f"torch threads {machine['torch_threads']}, features {', '.join(machine['cpu_features']) or '–'} "
        f"(torch kernels: {machine['torch_cpu_capability']})",
        f"- GPU: {gpus}" + (f", CUDA {machine['cuda_version']}" if machine["cuda_version"] else ""),
        f"- OS: {machine['os']}; host {machine['hostname']}; git {machine['git_commit'] or '–'}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
        f"- Load average (1/5/15 min) at start: {machine['load_average']}, at end: {machine.get('load_average_end')}"
        " (above ~0.5 per core, other work shares the cores and timings are low)",
        "",
    ]


def _matmul_section(records: list[dict]) -> list[str]:
    rows = [[r["device"], r["precision"], r["size"], r["median_gflops"], r["best_gflops"]] for r in records]
    if not rows:
        return []
    return [
        "## Matmul rate (square matmuls, same threads as the steps)",
        "",
        *_table(["device", "precision", "size", "GFLOP/s median", "GFLOP/s best"], rows),
        "",
    ]


def _step_section(records: list[dict]) -> tuple[list[str], list[str]]:
    ok = [r for r in records if "error" not in r]
    if not ok:
        return [], []
    rows = []
    for r in ok:
        rows.append(
            [
                r["case"],
                r["img_per_s"],
                r["img_per_s_best"],
                r["step_s_median"],
                r["flops_per_image"] / 1e9,
                r["achieved_gflops"],
                r.get("matmul_fp32_gflops"),
                r.get("fraction_of_matmul_fp32"),
                r.get("fraction_of_matmul_fp32_best"),
                r.get("fraction_of_matmul_fp32_cpu_time"),
                r.get(f"fraction_of_matmul_{r['precision']}") if r["precision"] != "fp32" else None,
                r.get("mfu"),
                r["peak_memory_mib"],
                r.get("cpu_utilisation"),
            ]
        )
    lines = [
        "## Pretraining step (PretrainTrainer.train_step: masks, forward, backward, AdamW, EMA)",
        "",
        *_table(
            [
                "case",
                "img/s",
                "img/s best",
                "step s",
                "GFLOP/img",
                "GFLOP/s",
                "fp32 matmul GFLOP/s",
                "of fp32 matmul",
                "(best)",
                "(CPU time)",
                "of bf16/fp16 matmul",
                "MFU",
                "peak MiB",
                "CPU util",
            ],
            rows,
        ),
        "",
        "Peak memory: process peak RSS during the steps on CPU (model, optimizer state, activations and the "
        "Python runtime), `torch.cuda.max_memory_allocated` on GPU. CPU util: CPU seconds per wall second per "
        "thread; well below 1 means other processes took the cores. (best): best step against best matmul, the "
        "quiet-machine estimate (other work only slows a run down); targets are judged on it. (CPU time): the "
        "fraction on CPU seconds instead of wall seconds, which other processes barely move with one thread.",
        "",
    ]
    targets = []
    by_key = {
        (r["arch"], r["precision"], r["device"], r["compile"], r.get("accum_steps", 1), r["batch"]): r for r in ok
    }
    for r in ok:
        accum = r.get("accum_steps", 1)
        if accum > 1:
            base = by_key.get((r["arch"], r["precision"], r["device"], r["compile"], 1, r["batch"]))
            if base:
                targets.append(
                    f"- {r['device'].upper()} {r['arch']} {r['precision']} step of {r['batch']} images as {accum} "
                    f"micro-steps / as one: {_fmt(r['step_s_best'] / base['step_s_best'])} of the time, best of each "
                    f"(medians: {_fmt(r['step_s_median'] / base['step_s_median'])})"
                )
            continue
        if r["device"] == "cpu" and r["precision"] == "fp32" and r["batch"] and not r["compile"]:
            frac = r.get("fraction_of_matmul_fp32_best")
            targets.append(
                f"- CPU {r['arch']} fp32 step at {_fmt(frac)} of the fp32 matmul rate, best of {r['steps']} "
                f"(median {_fmt(r['fraction_of_matmul_fp32'])}, on CPU time "
                f"{_fmt(r.get('fraction_of_matmul_fp32_cpu_time'))}; torch threads: {r['threads']}) "
                f"(target ≥ {TARGETS['cpu_fp32_fraction_of_matmul']}): "
                f"{_verdict(frac, TARGETS['cpu_fp32_fraction_of_matmul'])}"
            )
            if r.get("fraction_ceiling") is not None:
                targets.append(
                    f"  - its matmuls: {_fmt(r['matmul_time_share'])} of the profiled step at "
                    f"{_fmt(r['matmul_in_step_gflops'])} GFLOP/s; with every other op free the step would reach "
                    f"{_fmt(r['fraction_ceiling'])} of the matmul rate"
                )
        if r["precision"] == "bf16" and not r["compile"]:
            base = by_key.get((r["arch"], "fp32", r["device"], False, 1, r["batch"]))
            if base:
                ratio = r["img_per_s_best"] / base["img_per_s_best"]
                targets.append(
                    f"- {r['device'].upper()} {r['arch']} bf16 / fp32 img/s = {_fmt(ratio)}, best of each "
                    f"(medians: {_fmt(r['img_per_s'] / base['img_per_s'])}) "
                    f"(target ≥ {TARGETS['cpu_bf16_vs_fp32']}): {_verdict(ratio, TARGETS['cpu_bf16_vs_fp32'])}"
                )
            ref = REFERENCE_FP32_IMG_S.get(r["arch"])
            if r["device"] == "cpu" and ref and r["img_size"] == 224:
                ratio = r["img_per_s_best"] / ref
                targets.append(
                    f"- CPU {r['arch']} bf16 best / reference fp32 anchor ({ref} img/s) = {_fmt(ratio)} "
                    f"(target ≥ 2, valid only on the 2-core development machine): {_verdict(ratio, 2.0)}"
                )
        if r["device"] == "cuda" and r.get("mfu") is not None:
            targets.append(
                f"- GPU {r['case']} MFU {_fmt(r['mfu'])} (target ≥ {TARGETS['gpu_mfu']}): "
                f"{_verdict(r['mfu'], TARGETS['gpu_mfu'])}"
            )
    return lines, targets


def _input_section(records: list[dict]) -> tuple[list[str], list[str]]:
    pipes = [r for r in records if r.get("kind") == "pipeline"]
    colour = [r for r in records if r.get("kind") == "device_colour"]
    if not pipes:
        return [], []
    lines = [
        "## Input pipeline (one core, generated 500x375 JPEGs, decode included)",
        "",
        *_table(
            ["pipeline", "img/s per core", "CPU ms/img", "wall ms/img", "vs reference"],
            [[r["case"], r["img_per_s_per_core"], r["cpu_ms"], r["wall_ms"], r["speedup_vs_reference"]] for r in pipes],
        ),
        "",
    ]
    if colour:
        lines += [
            "Batched colour ops of the crop-only path, on the training device:",
            "",
            *_table(
                ["device", "batch", "ms/img", "img/s"],
                [[r["device"], r["batch"], r["ms_per_image"], r["img_per_s"]] for r in colour],
            ),
            "",
        ]
    targets = []
    crop = next((r for r in pipes if r["case"] == "crop_only"), None)
    if crop:
        targets.append(
            f"- Input: crop-only path {_fmt(crop['speedup_vs_reference'])}x cheaper per image than the "
            f"reference pipeline, {_fmt(crop['img_per_s_per_core'])} img/s per core (target ≥ "
            f"{TARGETS['input_speedup']}x): {_verdict(crop['speedup_vs_reference'], TARGETS['input_speedup'])}"
        )
    return lines, targets


def _checkpoint_section(records: list[dict]) -> list[str]:
    ok = [r for r in records if "error" not in r]
    if not ok:
        return []
    return [
        "## Checkpoint (full training state: student, teacher, AdamW moments, RNG)",
        "",
        *_table(
            ["case", "parameters", "file MiB", "save s", "load s", "save MiB/s", "load MiB/s"],
            [
                [
                    r["case"],
                    r["parameters"],
                    r["file_mib"],
                    r["save_s"],
                    r["load_s"],
                    r["save_mib_per_s"],
                    r["load_mib_per_s"],
                ]
                for r in ok
            ],
        ),
        "",
        "Save: atomic (temp file, fsync, sha256, rename). Load: verify + weights_only load + copy in; "
        "the file is usually still in the page cache.",
        "",
    ]


def _probe_section(records: list[dict]) -> list[str]:
    ok = [r for r in records if "error" not in r]
    if not ok:
        return []
    return [
        "## Evaluation throughput (tensors in, data loading excluded)",
        "",
        *_table(
            [
                "case",
                "linear probe img/s",
                "fast probe extract img/s",
                "head grid rows/s (heads)",
                "kNN pairs/s",
                "linear probe IN-1K h",
                "fast probe IN-1K h",
            ],
            [
                [
                    r["case"],
                    r["linear_probe_img_per_s"],
                    r["fast_probe_extract_img_per_s"],
                    f"{_fmt(r['fast_probe_head_rows_per_s'])} ({r['fast_probe_heads']})",
                    r["knn_pairs_per_s"],
                    r["linear_probe_imagenet_hours"],
                    r["fast_probe_imagenet_hours"],
                ]
                for r in ok
            ],
        ),
        "",
        "IN-1K h: projected hours for ImageNet-1K on this device (90 epochs; fast probe: one extraction, "
        "the grid on cached features, kNN of val against train).",
        "",
    ]


def gpu_projection(steps: list[dict], inputs: list[dict], cores_per_gpu: int, gpus: int = 8) -> list[str]:
    """300 ImageNet-1K epochs on `gpus` GPUs, limited by the step or by the CPU input pipeline."""
    crop = next((r for r in inputs if r.get("case") == "crop_only"), None)
    colour = next((r for r in inputs if r.get("kind") == "device_colour" and r["device"] == "cuda"), None)
    lines = []
    for r in steps:
        if r.get("device") != "cuda" or "error" in r:
            continue
        per_gpu = r["img_per_s"]
        if colour:  # the colour ops run on the GPU too
            per_gpu = 1.0 / (1.0 / per_gpu + colour["ms_per_image"] / 1e3)
        rate = gpus * per_gpu
        limit = "GPU"
        if crop:
            cpu_rate = gpus * cores_per_gpu * crop["img_per_s_per_core"]
            if cpu_rate < rate:
                rate, limit = cpu_rate, f"CPU input ({cores_per_gpu} cores per GPU)"
        hours = 300 * IMAGENET_TRAIN / rate / 3600
        lines.append(
            f"- {r['case']}: {_fmt(rate)} img/s on {gpus} GPUs ({limit}-bound) -> 300 epochs in "
            f"{_fmt(hours)} h (target ≤ {TARGETS['gpu_300_epoch_hours_8gpu']} h): "
            f"{_verdict(hours, TARGETS['gpu_300_epoch_hours_8gpu'], higher_is_better=False)}"
        )
    return lines


def render_summary(machine: dict, records: list[dict], command: str, run_id: str) -> str:
    """The Markdown summary of one run."""
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_bench[r["bench"]].append(r)
    lines = _machine_section(machine, command, run_id)
    lines += _matmul_section(by_bench["matmul"])
    step_lines, targets = _step_section(by_bench["pretrain_step"])
    input_lines, input_targets = _input_section(by_bench["input_pipeline"])
    lines += step_lines + input_lines + _checkpoint_section(by_bench["checkpoint"]) + _probe_section(by_bench["probes"])
    targets += input_targets
    cores_per_gpu = machine["usable_cores"] // max(1, len(machine["cuda_devices"]))
    targets += gpu_projection(by_bench["pretrain_step"], by_bench["input_pipeline"], cores_per_gpu)
    if targets:
        lines += ["## Targets (ratios measured side by side in this run)", "", *targets, ""]
    errors = _errors(records)
    if errors:
        lines += ["## Failed measurements", "", *errors, ""]
    return "\n".join(lines)
