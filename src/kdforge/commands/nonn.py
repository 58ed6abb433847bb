"""The ``kdforge nonn-partition`` and ``kdforge serve-nonn`` commands (wiring only).

The algorithms are :mod:`kdforge.nonn` (filter graph, partitions, the distributed runtime);
``cli.py`` calls ``add_commands`` when it builds its parser. Nothing heavy is imported until a
command runs.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def add_commands(sub: Any) -> None:
    part = sub.add_parser("nonn-partition", help="partition a teacher's final-layer filters for NoNN students")
    part.add_argument("teacher", help="teacher model file (.pt)")
    part.add_argument("--students", type=int, required=True, help="number of groups (one per student)")
    part.add_argument(
        "--method", default="spectral", choices=["louvain", "spectral", "spectral_recursive", "spectral_kway"]
    )
    part.add_argument("--graph", default="hebbian", choices=["hebbian", "noncoactivation", "correlation"])
    part.add_argument("--top-k", type=int, default=50, help="filters kept per image (co-activation graphs)")
    part.add_argument("--percentile", type=float, default=99.0, help="Louvain: edges below it are dropped")
    part.add_argument("--resolution", type=float, default=0.7, help="Louvain modularity resolution")
    part.add_argument("--seed", type=int, default=0, help="Louvain seed")
    part.add_argument("--normalized", action="store_true", help="spectral: normalised Laplacian")
    part.add_argument("--keep-largest", action="store_true", help="Louvain: do not discard the largest group")
    part.add_argument(
        "--underfull",
        choices=["split", "error"],
        default="split",
        help="Louvain, fewer communities than students: split the largest group, or fail",
    )
    part.add_argument("--layer", default="last_stage", help="teacher layer (default: its last stage)")
    part.add_argument("--data", help="dataset (default: the teacher's)")
    part.add_argument("--root", help="folder holding the dataset's files")
    part.add_argument(
        "--train-subset", type=int, help="class-balanced subset of the training split (as data.train_subset)"
    )
    part.add_argument("--images", type=int, help="use N training images only (seeded, class-balanced)")
    part.add_argument("--out", required=True, help="partition file to write (.json)")
    part.add_argument("--json", action="store_true", help="print the whole file")
    part.set_defaults(func=cmd_nonn_partition)

    serve = sub.add_parser(
        "serve-nonn", help="serve a NoNN system: one process per student, an aggregator with a deadline"
    )
    serve.add_argument("model", help="model file of a 'nonn' system (checkpoints/model_last.pt of a nonn run)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="aggregator port (default: any free port)")
    serve.add_argument("--deadline", type=float, default=1.0, help="seconds the aggregator waits for the devices")
    serve.add_argument("--fill", choices=["zeros", "neighbors"], help="failed devices (default: the model's)")
    serve.add_argument("--threads", type=int, default=1, help="torch threads per device process")
    serve.add_argument("--kill", type=int, nargs="+", default=[], metavar="I", help="kill these devices after start")
    serve.add_argument(
        "--eval", type=int, metavar="N", help="classify N test images (seeded, class-balanced), report, exit"
    )
    serve.add_argument("--batch-size", type=int, default=100)
    serve.add_argument("--uint8", action="store_true", help="send raw pixels (devices normalise) instead of float32")
    serve.add_argument("--data", help="dataset for --eval (default: the model's)")
    serve.add_argument("--root", help="folder holding the dataset's files")
    serve.add_argument("--json", action="store_true")
    serve.set_defaults(func=cmd_serve_nonn)


# ----------------------------------------------------------------------------- nonn-partition
def cmd_nonn_partition(args: argparse.Namespace) -> int:
    from kdforge.compress.arch import load_model_file
    from kdforge.config import DataConfig
    from kdforge.core.checkpoint import read_model_file
    from kdforge.core.errors import CheckpointError, ConfigError
    from kdforge.data import Augmentation
    from kdforge.engine.build import build_data
    from kdforge.methods.features import resolve_layers
    from kdforge.nonn import partition_teacher

    record = read_model_file(args.teacher)
    spec = record.get("model") or {}
    if not spec.get("name"):
        raise CheckpointError(f"'{args.teacher}' is a plain state dict; give a kdforge model file")
    dataset = args.data or (record.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError("the teacher file does not say its dataset; pass --data NAME")
    data = build_data(DataConfig(name=dataset, root=args.root, train_subset=args.train_subset, augment=False))
    teacher, _ = load_model_file(args.teacher)  # zoo name or model spec (the user's code, hf:)
    layer = resolve_layers(teacher, [args.layer])[0]
    from kdforge.data.splits import evaluation_subset

    images = data.train.images[evaluation_subset(data.train.labels, args.images)]
    started = time.perf_counter()
    partition = partition_teacher(
        teacher,
        images,
        layer,
        args.students,
        method=args.method,
        graph=args.graph,
        top_k=args.top_k,
        percentile=args.percentile,
        resolution=args.resolution,
        seed=args.seed,
        normalized=args.normalized,
        discard_largest=not args.keep_largest,
        underfull=args.underfull,
        normalize=Augmentation.for_dataset(data.info).normalize,
        source={"teacher": str(args.teacher), "dataset": dataset, "train_subset": args.train_subset},
    )
    partition.save(args.out)
    if args.json:
        print(json.dumps(partition.to_dict(), indent=1))
        return 0
    stats = partition.statistics
    print(
        f"{partition.method} partition of {partition.num_filters} '{layer}' filters into "
        f"{partition.num_groups} groups ({len(images)} images, {time.perf_counter() - started:.1f} s): "
        f"sizes {stats['sizes']}, discarded {stats['discarded']}, balance {stats['balance']:.2f}, "
        f"within-group weight {100 * stats['within_fraction']:.1f}% "
        f"(density {stats['within_density']:.3f} within vs {stats['between_density']:.3f} between)"
    )
    print(f"written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- serve-nonn
def cmd_serve_nonn(args: argparse.Namespace) -> int:
    import threading

    import torch

    from kdforge.nonn.serve import (
        Aggregator,
        AggregatorServer,
        DeviceCluster,
        load_system_record,
    )

    torch.set_num_threads(max(1, args.threads))
    record = load_system_record(args.model)
    started = time.perf_counter()
    with DeviceCluster(args.model, args.host, threads=args.threads) as cluster:
        startup = time.perf_counter() - started
        for index in args.kill:
            cluster.kill(index)
        aggregator = Aggregator.from_model_file(args.model, cluster.addresses, fill=args.fill, deadline=args.deadline)
        if args.eval:
            result = _evaluate(args, record, aggregator)
            result["startup_seconds"] = startup
            result["killed"] = list(args.kill)
            aggregator.close()
            if args.json:
                print(json.dumps(result))
            else:
                _print_eval(result)
            return 0
        server = AggregatorServer(aggregator, args.host, args.port)
        devices = ", ".join(f"{i}@{h}:{p}" for i, (h, p) in enumerate(cluster.addresses))
        print(
            f"NoNN aggregator on {server.address[0]}:{server.address[1]} (deadline {args.deadline} s, "
            f"fill {aggregator.fill}); devices {devices}; Ctrl-C stops",
            flush=True,
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.5)
        finally:
            server.close()
            aggregator.close()
    return 0


def _evaluate(args: argparse.Namespace, record: dict[str, Any], aggregator) -> dict[str, Any]:
    import torch

    from kdforge.config import DataConfig
    from kdforge.core.errors import ConfigError
    from kdforge.data import Augmentation
    from kdforge.engine.build import build_data
    from kdforge.nonn.serve import bytes_per_inference, load_system

    dataset = args.data or (record.get("dataset") or {}).get("name")
    if not dataset:
        raise ConfigError("the model file does not say its dataset; pass --data NAME")
    data = build_data(DataConfig(name=dataset, root=args.root, augment=False))
    from kdforge.data.splits import evaluation_subset

    test = data.test.select(evaluation_subset(data.test.labels, args.eval))  # class-balanced, never the first N
    count = len(test)
    normalize = Augmentation.for_dataset(data.info).normalize
    system = load_system(args.model)
    hits = agree = 0
    latencies, failures = [], {}
    sent = received = 0
    for start in range(0, count, args.batch_size):
        images = test.images[start : min(start + args.batch_size, count)]
        labels = test.labels[start : start + len(images)]
        x = images if args.uint8 else normalize(images)
        answer = aggregator.classify(x)
        with torch.inference_mode(), system.failing(answer.failed, aggregator.fill):
            local = system(normalize(images))
        hits += int((answer.logits.argmax(1) == labels).sum())
        agree += int((answer.logits.argmax(1) == local.argmax(1)).sum())
        latencies.append(answer.seconds)
        sent += answer.bytes_sent
        received += answer.bytes_received
        key = ",".join(map(str, answer.failed)) or "none"
        failures[key] = failures.get(key, 0) + 1
    batches = len(latencies)
    budget = bytes_per_inference(system.student_dim, system.num_students, tuple(test.images.shape[1:]))
    return {
        "model": str(args.model),
        "dataset": dataset,
        "images": count,
        "devices": system.num_students,
        "fill": aggregator.fill,
        "deadline": args.deadline,
        "top1": 100.0 * hits / max(count, 1),
        "agreement_with_in_process": 100.0 * agree / max(count, 1),
        "failed_devices_per_batch": failures,
        "mean_batch_seconds": sum(latencies) / max(batches, 1),
        "max_batch_seconds": max(latencies, default=0.0),
        "bytes_sent_per_image": sent / max(count, 1),
        "bytes_received_per_image": received / max(count, 1),
        "one_image_frames": budget,
        "input_dtype": "uint8" if args.uint8 else "float32",
    }


def _print_eval(result: dict[str, Any]) -> None:
    budget = result["one_image_frames"]
    print(
        f"NoNN system, {result['devices']} device processes (fill {result['fill']}, deadline {result['deadline']} s, "
        f"started in {result['startup_seconds']:.1f} s, killed {result['killed'] or 'none'})"
    )
    print(
        f"  {result['dataset']} test, {result['images']} images: top-1 {result['top1']:.2f}%, "
        f"agreement with in-process inference {result['agreement_with_in_process']:.2f}%"
    )
    print(f"  failed devices per batch: {result['failed_devices_per_batch']}")
    print(
        f"  batch latency: mean {1000 * result['mean_batch_seconds']:.1f} ms, max {1000 * result['max_batch_seconds']:.1f} ms"  # noqa: E501
    )
    print(
        f"  bytes per image: sent to devices {result['bytes_sent_per_image']:.0f} ({result['input_dtype']} inputs), "
        f"features received {result['bytes_received_per_image']:.0f}"
    )
    print(
        f"  one image alone: features from all devices {budget['features_total']} B "
        f"(payload {budget['features_payload_total']} B) vs the input to one model "
        f"{budget['single_model_uint8']} B uint8 / {budget['single_model_float32']} B float32 "
        f"({budget['raw_uint8_pixels']} raw pixel bytes)"
    )
