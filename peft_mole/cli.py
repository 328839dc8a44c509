"""`peft-mole` console script: a thin layer over the public API.

    peft-mole train jobs.yaml [--resume | --overwrite]
    peft-mole convert-bin ADAPTER_DIR
    peft-mole convert --from moe-peft SRC DST      (or --to moe-peft; mixlora for the `mixlora` package)
    peft-mole eval --base PATH_OR_ID --adapters DIR[,DIR...] --tasks arc_e,boolq [--data-dir DIR] [--out DIR]

`train` runs a MultiJobTrainer from a YAML job file (peft_mole/multijob/job_file.py documents the keys); `eval`
writes `eval.json` and `eval.md` (accuracy per adapter and task) to --out and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path


def adapter_name(path: str, index: int) -> str:
    """The adapter name of a folder or hub id in `peft-mole eval`: its last part, with each character a PyTorch
    module name cannot hold ("." in "qwen2.5-mixlora") made "_"; `adapter{index}` for none, the reserved
    "__base__" and the names torch's module containers hold ("train", "keys")."""
    name = re.sub(r"[^\w-]", "_", Path(path).name)
    from torch import nn

    taken = hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name)  # "train", "keys": a layer's
    return f"adapter{index}" if not name or name.startswith("__") or taken else name  # entries cannot take them


def _eval(args: argparse.Namespace) -> int:
    import peft_mole  # noqa: F401  (registers the adapter types)
    from peft_mole.evaluation import TASKS

    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))  # (each task once)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks has unknown task(s) {unknown}; allowed: {sorted(TASKS)}")
    if not tasks:
        raise SystemExit(f"--tasks needs at least one task; allowed: {sorted(TASKS)}")
    adapter_dirs = [a.strip() for a in args.adapters.split(",") if a.strip()]
    if not adapter_dirs:
        raise SystemExit("--adapters needs at least one adapter folder or hub id")
    for path in adapter_dirs:
        config_path = Path(path) / "adapter_config.json"
        hub = not Path(path).exists()
        if hub:  # a hub id: its config as PEFT would read it (from the cache offline); None: PEFT will say more
            config_path = _hub_adapter_config(path)
        if config_path is None or not config_path.is_file():
            continue  # a folder PEFT will say more about
        try:
            kind = json.loads(config_path.read_text()).get("peft_type")
        except (ValueError, AttributeError) as error:
            raise SystemExit(f"peft-mole eval: {config_path} is not a JSON object: {error}") from None
        if kind == "MIXLORA":
            raise SystemExit(f"peft-mole eval: {path} is a MoE-PEFT adapter; convert it first: "
                             f"peft-mole convert --from moe-peft {path} NEW_FOLDER")
        if not hub and not any((Path(path) / name).is_file()
                               for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise SystemExit(f"peft-mole eval: {path} holds adapter_config.json but no adapter_model.safetensors")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be at least 1 (examples per task), got {args.limit}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # known now, not after the evaluation
        raise SystemExit(f"--out {out}: {blocking} exists and is not a folder")
    try:
        return _evaluate(args, tasks, adapter_dirs, out)
    except (OSError, ValueError, KeyError) as error:  # a path, hub id or file that cannot be read
        raise SystemExit(f"peft-mole eval: {type(error).__name__}: {error}") from None
    except RuntimeError as error:  # torch's load_state_dict: an adapter of another base's sizes
        if "state_dict" not in str(error):
            raise
        raise SystemExit(f"peft-mole eval: an adapter of {adapter_dirs} does not fit --base {args.base!r} (was it "
                         f"trained on another base?): {str(error)[:2000]}") from None


def _hub_adapter_config(repo_id: str) -> Path | None:
    """The adapter_config.json of a Hub id, downloaded or from the cache as PEFT reads it (before 2026-12-06 a
    MoE-PEFT adapter's Hub id failed with a bare `KeyError: 'MIXLORA'` where its folder got the conversion hint);
    None where it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "adapter_config.json"))
    except Exception:  # noqa: BLE001 — not a repo id, offline and not cached, no such file: PEFT reports it
        return None


def _evaluate(args: argparse.Namespace, tasks: list[str], adapter_dirs: list[str], out: Path) -> int:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_mole.evaluation import evaluate_commonsense, load_task

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.base)
    names = [adapter_name(a, i) for i, a in enumerate(adapter_dirs)]
    if len(set(names)) != len(names):
        names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    data = {t: load_task(t, args.data_dir, limit=args.limit) for t in tasks}
    # adapters of one PEFT type in one pass; PEFT keeps one type per model, so each type gets a base of its own
    by_type: dict[str, list[tuple[str, str]]] = {}
    for name, path in zip(names, adapter_dirs, strict=True):
        by_type.setdefault(str(PeftConfig.from_pretrained(path).peft_type), []).append((name, path))
    scores = {}
    for group in by_type.values():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base), group[0][1],
                                          adapter_name=group[0][0])
        for name, path in group[1:]:
            model.load_adapter(path, adapter_name=name)
        scores.update(evaluate_commonsense(model, tokenizer, data, adapters=[n for n, _ in group],
                                           batch_size=args.batch_size))
        del model
    scores = {name: scores[name] for name in names}
    table = ["| adapter | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for name in names:
        table.append(f"| {name} | " + " | ".join(f"{scores[name][t]:.4f}" for t in tasks)
                     + f" | {scores[name]['average']:.4f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"adapters": dict(zip(names, adapter_dirs, strict=True)),
                                                "scores": scores}, indent=2))
    (out / "eval.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


def _train(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from peft_mole.multijob.checkpoint import STATE_FILE
    from peft_mole.multijob.job_file import load_run
    from peft_mole.multijob.trainer import MultiJobTrainer
    from peft_mole.multijob.trainer_args import load_base_model

    try:
        spec = load_run(args.job_file)
    except ValueError as error:
        raise SystemExit(f"peft-mole train: {error}") from None
    if not args.resume and not args.overwrite:
        ended = [job.name for job in spec.jobs
                 if os.path.exists(os.path.join(spec.output_dir, job.name, STATE_FILE))]
        if ended:  # (a fresh run would replace their adapters at its end)
            raise SystemExit(f"peft-mole train: output_dir {spec.output_dir!r} holds the trained adapters of an "
                             f"earlier run for jobs {ended}; pass --resume to continue that run, --overwrite to train "
                             "them afresh and replace those adapters, or choose another output_dir")
    try:
        config = SFTConfig(output_dir=spec.output_dir, **spec.args)
    except (TypeError, ValueError) as error:  # the job file's args, as SFTConfig checks them
        raise SystemExit(f"peft-mole train: {error}") from None
    # as SFTTrainer loads the processor: remote code where the args allow it, and the model's revision where the
    # tokenizer is the model's own (another tokenizer repo has revisions of its own)
    revision = (config.model_init_kwargs or {}).get("revision") if spec.tokenizer == spec.model else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=config.trust_remote_code,
                                                  revision=revision)
    except (OSError, ValueError) as error:
        raise SystemExit(f"peft-mole train: tokenizer {spec.tokenizer!r} cannot be loaded: {error}") from None
    try:
        model = load_base_model(spec.model, config)  # as SFTTrainer loads it (seeded, args.model_init_kwargs, dtype)
        config.model_init_kwargs = None  # used (SFTTrainer would warn that they are ignored; the trainer does the
        # same for a path it loads, `without_init_kwargs`)
    except OSError as error:
        raise SystemExit(f"peft-mole train: model {spec.model!r} cannot be loaded: {error}") from None
    except (TypeError, ValueError) as error:  # the job file's args, as SFTConfig checks them
        raise SystemExit(f"peft-mole train: {error}") from None
    try:
        trainer = MultiJobTrainer(
            model=model, jobs=spec.jobs, args=config, processing_class=tokenizer,
            max_concurrent_jobs=spec.max_concurrent_jobs, max_memory=spec.max_memory,
            step_overhead_tokens=spec.step_overhead_tokens,
        )
    except OSError as error:  # a folder that cannot be made (Trainer makes output_dir), named by the key
        filename, output = os.path.abspath(str(error.filename or "")), os.path.abspath(spec.output_dir)
        if error.filename and os.path.commonpath([filename, output]) == filename:  # output_dir or a folder above it
            raise SystemExit(f"peft-mole train: output_dir {spec.output_dir!r} cannot be made: {error}") from None
        raise SystemExit(f"peft-mole train: {error}") from None
    except (TypeError, ValueError) as error:  # the job file's args, as the trainer checks them
        raise SystemExit(f"peft-mole train: {error}") from None
    from peft_mole.multijob.trainer_args import JobSetupError

    try:
        trainer.train(resume_from_checkpoint=True if args.resume else None)
    except JobSetupError as error:  # what train() checks as it begins (a job's batches, a checkpoint to resume);
        raise SystemExit(f"peft-mole train: {error}") from None  # any other error keeps its traceback
    failed = [row["job"] for row in trainer.job_summary if row["status"] == "failed"]
    return 1 if failed else 0


def _convert_bin(args: argparse.Namespace) -> int:
    from peft_mole.tuners.load_checks import convert_bin_adapter

    try:
        print(f"wrote {convert_bin_adapter(args.folder, overwrite=args.overwrite)}")
    except (ValueError, OSError) as error:
        raise SystemExit(f"peft-mole convert-bin: {error}") from None
    return 0


def _convert(args: argparse.Namespace) -> int:
    from peft_mole.interop import export_moe_peft, import_moe_peft

    if (args.source_format is None) == (args.target_format is None):
        raise SystemExit("peft-mole convert: give exactly one of --from or --to (moe-peft or mixlora)")
    if args.source_format and args.act_fn:
        raise SystemExit("peft-mole convert: --act-fn is written on export only (use it with --to)")
    try:
        if args.source_format:
            config = import_moe_peft(args.src, args.dst, flavour=args.source_format, overwrite=args.overwrite)
            print(f"wrote a peft-mole MixLoRA adapter ({config.num_experts} experts, top-{config.top_k}) to {args.dst}")
        else:
            export_moe_peft(args.src, args.dst, flavour=args.target_format, act_fn=args.act_fn,
                            overwrite=args.overwrite)
            print(f"wrote a {args.target_format} MixLoRA adapter to {args.dst}")
    except (ValueError, TypeError, OSError) as error:  # (TypeError: a config field's kind, named by the config)
        raise SystemExit(f"peft-mole convert: {error}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-mole", description="peft-mole command line")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train several adapters at once from a YAML job file")
    train.add_argument("job_file", help="YAML: model, output_dir, args, jobs (see examples/jobs.yaml)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue each job from its latest checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="train afresh where output_dir holds an earlier run's adapters (replaced at the end)")
    train.set_defaults(run=_train)
    convert = commands.add_parser("convert-bin", help="opt in to a trusted pickle adapter_model.bin: write safetensors")
    convert.add_argument("folder", help="adapter folder holding adapter_model.bin")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing adapter_model.safetensors")
    convert.set_defaults(run=_convert_bin)
    interop = commands.add_parser("convert", help="convert MixLoRA adapters from/to MoE-PEFT / the mixlora package")
    interop.add_argument("--from", dest="source_format", choices=["moe-peft", "mixlora"],
                         help="SRC is a MoE-PEFT or `mixlora` package adapter")
    interop.add_argument("--to", dest="target_format", choices=["moe-peft", "mixlora"],
                         help="write DST in that format (the same files; 'mixlora' also needs act_fn)")
    interop.add_argument("--act-fn", help="activation written as act_fn (default: the base model's hidden_act)")
    interop.add_argument("--overwrite", action="store_true", help="replace DST when it already holds files")
    interop.add_argument("src")
    interop.add_argument("dst")
    interop.set_defaults(run=_convert)
    evaluation = commands.add_parser("eval", help="commonsense accuracy of one or more adapters, in one pass")
    evaluation.add_argument("--base", required=True, help="base model: local path or hub id")
    evaluation.add_argument("--tokenizer", help="tokenizer path or id (default: --base)")
    evaluation.add_argument("--adapters", required=True, help="comma-separated adapter folders or hub ids")
    evaluation.add_argument("--tasks", required=True, help="comma-separated: arc_e,arc_c,boolq,obqa,piqa,siqa,...")
    evaluation.add_argument("--data-dir", help="folder with <task>.jsonl in the Hub schema (default: the Hub)")
    evaluation.add_argument("--limit", type=int, help="first N examples per task")
    evaluation.add_argument("--batch-size", type=int, default=8)
    evaluation.add_argument("--out", default="eval-results",
                            help="folder for eval.json and eval.md (default: ./eval-results)")
    evaluation.set_defaults(run=_eval)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
