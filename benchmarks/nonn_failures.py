"""NoNN failure study: accuracy with 0, 1, ..., N/2 failed devices, Louvain vs spectral
partitions, with and without the averaging redundancy; bytes per inference; a real served check.

For every student count N it trains the four stages of ``configs/recipes/nonn_cifar10.yaml``
(louvain, louvain_avg, spectral, spectral_avg; finished stages are reused), then for each system

* evaluates the whole test set with every set of k failed devices, k = 0 .. N/2 (all
  combinations, or a seeded sample of ``--max-combos`` of them), each failed device replaced by
  zeros and, separately, by the mean of its neighbours (features are computed once per student,
  so each combination only reruns the head);
* reports the bytes one inference sends under the wire protocol of ``kdforge.nonn.serve``
  (pooled features of every device) against sending the input to one large model;
* serves one system for real (one process per student on 127.0.0.1), classifies
  ``--serve-images`` test images one at a time, kills N/2 devices and classifies them again,
  checking that every answer came within the deadline and matches in-process inference.

It also tabulates partition statistics (sizes, discarded filters, within-group weight) for
both graphs and all partition methods, on the teacher's training activations.

    python benchmarks/nonn_failures.py [--students 4 8] [--out runs/nonn_failures] [--record]
    python benchmarks/nonn_failures.py --quick          # digits, tiny networks, about 3 minutes

``--record`` appends the tables to benchmarks/RESULTS.md and saves the plot as
benchmarks/nonn_failures.png (a --quick run writes its plot only into --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "nonn_cifar10.yaml"
STAGES = ("louvain", "louvain_avg", "spectral", "spectral_avg")
LABELS = {
    "louvain": "Louvain (NoNN), no redundancy",
    "louvain_avg": "Louvain, averaging redundancy",
    "spectral": "spectral (balanced), no redundancy",
    "spectral_avg": "spectral, averaging redundancy",
}


# --------------------------------------------------------------------------- recipes
def quick_recipe() -> dict[str, Any]:
    """Digits: a LeNet teacher trained here, then four NoNN systems of LeNet (width 0.5) students."""
    train = {
        "batch_size": 64,
        "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
        "scheduler": {"name": "cosine"},
        "grad_clip": 5.0,
        "progress": "none",
    }
    data = {"name": "digits", "augment": False}
    student = {"name": "nonn", "kwargs": {"student": "lenet", "student_kwargs": {"width": 0.5}, "num_students": 4}}
    teacher = [{"checkpoint": "{teacher}/checkpoints/model_last.pt"}]
    louvain = {"name": "nonn", "partition": "louvain", "graph": "hebbian", "top_k": 8, "percentile": 80, "beta": 100}
    spectral = {"name": "nonn", "partition": "spectral", "graph": "correlation", "beta": 100}
    redundant = {"redundancy": 0.5, "fill": "neighbors"}
    stage = lambda name, method: {  # noqa: E731
        "name": f"digits_nonn_{name}",
        "data": data,
        "student": student,
        "teachers": teacher,
        "method": method,
        "train": {**train, "epochs": 6},
    }
    return {
        "pipeline": {
            "teacher": {
                "name": "digits_lenet",
                "data": data,
                "student": {"name": "lenet"},
                "method": {"name": "ce"},
                "train": {**train, "epochs": 10, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
            },
            "louvain": stage("louvain", louvain),
            "louvain_avg": stage("louvain_avg", {**louvain, **redundant}),
            "spectral": stage("spectral", spectral),
            "spectral_avg": stage("spectral_avg", {**spectral, **redundant}),
        }
    }


def train_systems(recipe: dict[str, Any], recipe_dir: Path, out: Path, students: int) -> dict[str, dict]:
    from kdforge.cli import train_run
    from kdforge.engine.pipeline import run_pipeline

    overrides = [f"{name}:student.kwargs.num_students={students}" for name in STAGES]
    return run_pipeline(recipe, recipe_dir, out, overrides, train_run)


# --------------------------------------------------------------------------- failure study
def combinations(n: int, k: int, limit: int, rng: random.Random) -> tuple[list[tuple[int, ...]], bool]:
    """Every k-subset of range(n) when there are at most ``limit``, else ``limit`` distinct
    seeded-random ones; the flag says whether the list is exhaustive."""
    total = math.comb(n, k)
    if total <= limit:
        return list(itertools.combinations(range(n), k)), True
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < limit:
        chosen.add(tuple(sorted(rng.sample(range(n), k))))
    return sorted(chosen), False


@torch.inference_mode()
def student_features(system, images, normalize, batch_size: int = 500) -> list[torch.Tensor]:
    chunks: list[list[torch.Tensor]] = [[] for _ in range(system.num_students)]
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size])
        for i, student in enumerate(system.students):
            chunks[i].append(student(x))
    return [torch.cat(c) for c in chunks]


@torch.inference_mode()
def failure_curve(system, features, labels, max_combos: int, seed: int) -> dict[str, Any]:
    from kdforge.models.nonn import fill_missing

    n = system.num_students
    rng = random.Random(seed)
    out: dict[str, Any] = {"exhaustive": {}, "combos": {}}
    for fill in ("zeros", "neighbors"):
        rows = []
        for k in range(n // 2 + 1):
            combos, exhaustive = combinations(n, k, max_combos, rng)
            out["exhaustive"][k] = exhaustive
            out["combos"][k] = len(combos)
            accs = []
            for failed in combos:
                feats = [None if i in failed else f for i, f in enumerate(features)]
                logits = system.head(torch.cat(fill_missing(feats, fill), dim=1))
                accs.append(100.0 * float((logits.argmax(1) == labels).float().mean()))
            rows.append({"failed": k, "mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs)})
        out[fill] = rows
    return out


# --------------------------------------------------------------------------- partitions
def partition_table(teacher_path: str, data, normalize, students: list[int], settings: dict) -> list[dict]:
    from kdforge.core.checkpoint import load_weights, read_model_file
    from kdforge.methods.features import resolve_layers
    from kdforge.models import create
    from kdforge.nonn.graph import filter_graph, pooled_activations
    from kdforge.nonn.partition import partition_filters

    record = read_model_file(teacher_path)
    spec = record["model"]
    teacher = create(
        spec["name"],
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        input_size=tuple(spec["input_size"]) if spec.get("input_size") else None,
        **spec.get("kwargs", {}),
    )
    load_weights(teacher, record["state_dict"], teacher_path)
    layer = resolve_layers(teacher, ["last_stage"])[0]
    activations = pooled_activations(teacher, data.train.images, layer, normalize=normalize)
    rows = []
    for graph in ("hebbian", "correlation"):
        weights = filter_graph(activations, graph, settings["top_k"])
        for n in students:
            for method in ("louvain", "spectral", "spectral_recursive", "spectral_kway"):
                try:
                    part = partition_filters(
                        weights, n, method, percentile=settings["percentile"], resolution=settings["resolution"]
                    )
                except Exception as exc:  # noqa: BLE001 - a row that says why
                    rows.append({"graph": graph, "students": n, "method": method, "error": str(exc)})
                    continue
                s = part.statistics
                rows.append(
                    {
                        "graph": graph,
                        "students": n,
                        "method": method,
                        "sizes": s["sizes"],
                        "discarded": s["discarded"],
                        "balance": s["balance"],
                        "within_fraction": s["within_fraction"],
                        "modularity": s["modularity"],
                        "splits": part.settings.get("splits"),
                    }
                )
    return rows


# --------------------------------------------------------------------------- serving
def serve_check(model_path: Path, data, normalize, images: int, deadline: float, seed: int) -> dict[str, Any]:
    from kdforge.nonn.serve import Aggregator, DeviceCluster, load_system

    system = load_system(model_path)
    n = system.num_students
    kill = sorted(random.Random(seed).sample(range(n), n // 2))
    from kdforge.data.splits import evaluation_subset

    chosen = evaluation_subset(data.test.labels, images, seed)  # class-balanced: the test set may be sorted
    x_all = data.test.images[chosen]
    labels = data.test.labels[chosen]
    result: dict[str, Any] = {"model": str(model_path), "devices": n, "deadline": deadline, "killed": kill}
    started = time.perf_counter()
    with DeviceCluster(model_path) as cluster:
        result["startup_seconds"] = time.perf_counter() - started
        with Aggregator.from_model_file(model_path, cluster.addresses, deadline=deadline) as agg:
            for phase in ("all_up", "half_killed"):
                if phase == "half_killed":
                    for i in kill:
                        cluster.kill(i)
                hits = agree = 0
                worst = 0.0
                sent = received = 0
                failed_seen: set[tuple[int, ...]] = set()
                for j in range(len(x_all)):
                    x = normalize(x_all[j : j + 1])
                    answer = agg.classify(x)
                    with torch.inference_mode(), system.failing(answer.failed, agg.fill):
                        local = system(x)
                    hits += int(answer.logits.argmax(1).item() == int(labels[j]))
                    agree += int(answer.logits.argmax(1).item() == local.argmax(1).item())
                    worst = max(worst, answer.seconds)
                    sent += answer.bytes_sent
                    received += answer.bytes_received
                    failed_seen.add(tuple(answer.failed))
                result[phase] = {
                    "top1": 100.0 * hits / len(x_all),
                    "agreement": 100.0 * agree / len(x_all),
                    "max_seconds": worst,
                    "within_deadline": worst <= deadline + 0.05,
                    "bytes_sent_per_inference": sent / len(x_all),
                    "bytes_received_per_inference": received / len(x_all),
                    "failed_sets": sorted(failed_seen),
                }
    return result


# --------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    lines = []
    for n_key, block in results["systems"].items():
        n = int(n_key)
        k_max = n // 2
        combos = block["combos"]
        head = " | ".join(
            f"{k} failed ({combos[str(k)] if str(k) in combos else combos[k]}{'' if block['exhaustive'].get(str(k), block['exhaustive'].get(k)) else ' sampled'})"  # noqa: E501
            for k in range(k_max + 1)
        )
        lines.append(
            f"\n**{n} devices.** Test top-1 (%) as mean (min-max) over the sets of failed devices; "
            f"teacher {results['teacher_top1']:.2f}%.\n"
        )
        lines.append(f"| system | fill | train min | {head} |")
        lines.append("| --- | --- | ---: | " + " | ".join(["---:"] * (k_max + 1)) + " |")
        for stage in STAGES:
            entry = block["stages"].get(stage)
            if entry is None:
                continue
            for fill in ("zeros", "neighbors"):
                cells = " | ".join(
                    f"{r['mean']:.2f} ({r['min']:.1f}-{r['max']:.1f})" if r["failed"] else f"{r['mean']:.2f}"
                    for r in entry["curve"][fill]
                )
                mark = " *" if fill == entry["trained_fill"] else ""
                lines.append(f"| {LABELS[stage]} | {fill}{mark} | {entry['train_minutes']:.1f} | {cells} |")
        b = block["bytes"]
        lines.append(
            f"\nBytes per inference (one image, protocol frames with headers): pooled features of all "
            f"{n} devices {b['features_total']} B ({b['features_payload_total']} B payload) vs the input "
            f"to one large model {b['single_model_uint8']} B as uint8 ({b['raw_uint8_pixels']} raw pixel bytes) "
            f"or {b['single_model_float32']} B as float32. Broadcasting the input to every device would add "
            f"{b['broadcast_uint8_total']} B (uint8)."
        )
        serve = block.get("serve")
        if serve:
            up, down = serve["all_up"], serve["half_killed"]
            lines.append(
                f"\nServed for real ({n} processes on 127.0.0.1, {serve['images']} test images one at a time, "
                f"deadline {serve['deadline']} s, `{Path(serve['model']).parent.parent.name}`): all up "
                f"top-1 {up['top1']:.1f}%, slowest answer {1000 * up['max_seconds']:.0f} ms; devices "
                f"{serve['killed']} killed: top-1 {down['top1']:.1f}%, slowest answer "
                f"{1000 * down['max_seconds']:.0f} ms, every answer within the deadline: "
                f"{'yes' if up['within_deadline'] and down['within_deadline'] else 'NO'}; agreement with "
                f"in-process inference {up['agreement']:.0f}% / {down['agreement']:.0f}%; bytes received per "
                f"inference {up['bytes_received_per_inference']:.0f} / {down['bytes_received_per_inference']:.0f}."
            )
    lines.append(
        "\nPartition statistics on the teacher's training activations "
        "(within = share of the graph's weight inside groups; discarded = filters no student mimics):\n"
    )
    lines.append("| graph | devices | method | sizes | discarded | balance | within (%) | modularity |")
    lines.append("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for row in results["partitions"]:
        if "error" in row:
            lines.append(
                f"| {row['graph']} | {row['students']} | {row['method']} | error: {row['error'][:60]} | | | | |"
            )
            continue
        split = f" ({row['splits']} split)" if row.get("splits") else ""
        mod = "—" if row["modularity"] is None else f"{row['modularity']:.3f}"
        lines.append(
            f"| {row['graph']} | {row['students']} | {row['method']}{split} | {row['sizes']} | "
            f"{row['discarded']} | {row['balance']:.2f} | {100 * row['within_fraction']:.1f} | {mod} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = results["systems"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(6 * len(blocks), 4.2), squeeze=False)
    for ax, (n_key, block) in zip(axes[0], blocks.items()):
        for stage in STAGES:
            entry = block["stages"].get(stage)
            if entry is None:
                continue
            fill = entry["trained_fill"]
            rows = entry["curve"][fill]
            ks = [r["failed"] for r in rows]
            ax.plot(ks, [r["mean"] for r in rows], marker="o", label=f"{LABELS[stage]} ({fill})")
            ax.fill_between(ks, [r["min"] for r in rows], [r["max"] for r in rows], alpha=0.15)
        ax.axhline(results["teacher_top1"], color="gray", linestyle="--", linewidth=1, label="teacher")
        ax.set_xlabel("failed devices")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"NoNN, {n_key} devices ({results['dataset']})")
        ax.set_xticks(range(int(n_key) // 2 + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", type=int, nargs="+", help="device counts (default 4 8; --quick: 4)")
    parser.add_argument("--out", help="folder for the runs and results (default runs/nonn_failures[_quick])")
    parser.add_argument("--max-combos", type=int, default=100, help="sample this many failure sets when there are more")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-images", type=int, default=200, help="test images for the served check (0: skip)")
    parser.add_argument("--deadline", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="digits, tiny networks, a few epochs")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md, plot to benchmarks/")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.path.insert(0, str(ROOT / "src"))

    from kdforge.cli import _quiet_libraries
    from kdforge.config import DataConfig, read_yaml
    from kdforge.data import Augmentation
    from kdforge.engine.build import build_data
    from kdforge.engine.pipeline import stage_recipes
    from kdforge.engine.trainer import evaluate_model
    from kdforge.nonn.serve import bytes_per_inference, load_system

    _quiet_libraries()
    started = time.perf_counter()
    students = args.students or ([4] if args.quick else [4, 8])
    out = Path(args.out or ("runs/nonn_failures_quick" if args.quick else "runs/nonn_failures"))
    recipe = quick_recipe() if args.quick else read_yaml(RECIPE)
    recipe_dir = ROOT / "benchmarks" if args.quick else RECIPE.parent
    stages = stage_recipes(recipe, recipe_dir)
    first = stages["louvain"]
    data_cfg = DataConfig(**{**first["data"], "augment": False})
    data = build_data(data_cfg)
    normalize = Augmentation.for_dataset(data.info).normalize
    labels = data.test.labels

    results: dict[str, Any] = {"dataset": data.info.name, "quick": args.quick, "systems": {}}
    for n in students:
        out_n = out / f"n{n}"
        summaries = train_systems(recipe, recipe_dir, out_n, n)
        teacher_ckpt = (
            (out_n / "teacher" / "checkpoints" / "model_last.pt")
            if args.quick
            else Path(first["teachers"][0]["checkpoint"])
        )
        block: dict[str, Any] = {"stages": {}}
        for stage in STAGES:
            model_path = out_n / stage / "checkpoints" / "model_last.pt"
            system = load_system(model_path)
            features = student_features(system, data.test.images, normalize)
            curve = failure_curve(system, features, labels, args.max_combos, args.seed)
            block["combos"], block["exhaustive"] = curve.pop("combos"), curve.pop("exhaustive")
            summary = summaries.get(stage, {})
            block["stages"][stage] = {
                "curve": curve,
                "trained_fill": system.fill,
                "groups": system.groups,
                "partition_statistics": (system.partition or {}).get("statistics"),
                "train_minutes": summary.get("train_seconds", float("nan")) / 60,
                "top1_trainer": ((summary.get("final") or {}).get("test") or {}).get("top1"),
            }
            print(
                f"[n={n}] {stage}: " + ", ".join(f"{r['failed']} failed {r['mean']:.2f}" for r in curve[system.fill]),
                flush=True,
            )
        block["bytes"] = bytes_per_inference(system.student_dim, n, tuple(data.test.images.shape[1:]))
        if args.serve_images:
            serve_model = out_n / "spectral_avg" / "checkpoints" / "model_last.pt"
            block["serve"] = serve_check(serve_model, data, normalize, args.serve_images, args.deadline, args.seed)
            block["serve"]["images"] = args.serve_images
            print(
                f"[n={n}] served: {json.dumps({k: block['serve'][k] for k in ('all_up', 'half_killed')})}", flush=True
            )
        results["systems"][str(n)] = block

    from kdforge.core.checkpoint import load_weights, read_model_file
    from kdforge.models import create

    record = read_model_file(teacher_ckpt)
    spec = record["model"]
    teacher = create(
        spec["name"],
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        input_size=tuple(spec["input_size"]) if spec.get("input_size") else None,
        **spec.get("kwargs", {}),
    )
    load_weights(teacher, record["state_dict"], str(teacher_ckpt))
    results["teacher_top1"] = evaluate_model(teacher, data.test, Augmentation.for_dataset(data.info), 500)["top1"]
    louvain_method = first["method"]
    results["partitions"] = partition_table(
        str(teacher_ckpt),
        data,
        normalize,
        students,
        {
            "top_k": louvain_method.get("top_k", 50),
            "percentile": louvain_method.get("percentile", 99.0),
            "resolution": louvain_method.get("resolution", 0.7),
        },
    )
    results["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot_path = (
        ROOT / "benchmarks" / "nonn_failures.png" if args.record and not args.quick else out / "nonn_failures.png"
    )
    plot(results, plot_path)
    print(table)
    print(f"results in {out} (plot {plot_path}); {results['seconds'] / 60:.1f} min")
    if args.record:
        command = (
            "python benchmarks/nonn_failures.py"
            + (" --quick" if args.quick else "")
            + (f" --students {' '.join(map(str, students))}" if args.students else "")
            + " --record"
        )
        setting = (
            "Quick mode: bundled digits, a LeNet teacher trained by the script, LeNet (width 0.5) students, "
            f"6 epochs; mechanics only. Plot: `{plot_path}`."
            if args.quick
            else "Recipe `configs/recipes/nonn_cifar10.yaml` (teacher resnet20, students resnet8 at half width, "
            "10,000-image subset, 15 epochs). Plot: `benchmarks/nonn_failures.png`."
        )
        section = (
            f"\n## NoNN failure study (`{command}`), {time.strftime('%Y-%m-%d')}\n\n"
            f"{setting} Full test set; failure sets exhaustive when there are at most {args.max_combos} "
            f"for a count, else a seeded sample of {args.max_combos}; `*` marks the fill the system was "
            f"trained for. Bar: with half of 8 devices failed, accuracy stays high (the qualitative "
            f"claim of Jeong, Park, Yang, Electronics 2021; the abstract gives no number).\n"
            f"{table}"
        )
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as handle:
            handle.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
