"""`hf-metagpt` / `hf metagpt`: thin argument parsing over the Python API. Printing lives here only."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import NoReturn, Sequence

from .constants import HUB_TOKENS_ENV, WORKERS_ENV, env as env_value
from .errors import MergeError
from .options import DTYPES

log = logging.getLogger("hf_metagpt")


def _add_merge_args(p: argparse.ArgumentParser, *, for_plan: bool = False) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL", help="fine-tuned models: local folders or Hub IDs (org/name[@rev])")
    p.add_argument("--base", help="the base model the fine-tunes were trained from")
    p.add_argument("--recipe", help="YAML recipe with the same options (flags override it); a mergekit recipe "
                   "(with `merge_method`) is read as mergekit's")
    p.add_argument("--recipe-format", choices=["auto", "hf-metagpt", "mergekit"], default="auto",
                   help="how to read --recipe (auto: mergekit's when it has a merge_method key)")
    p.add_argument("--output", "-o", help="output folder")
    p.add_argument("--method", help="merge method (default: metagpt; the list is below)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, e.g. --param density=0.5 or --param weights=[0.3,0.7] (repeatable)")
    p.add_argument("--granularity", choices=["model", "layer", "tensor"],
                   help="where MetaGPT takes its norms: model (the paper, default), layer or tensor (our extension)")
    p.add_argument("--tokenizer-source", help="'base' (default) or one of the fine-tunes: whose vocabulary and tokenizer the output gets")
    p.add_argument("--chat-template", help="the output's chat template: auto (the most common among the models), chatml, "
                                           "llama3, alpaca, mistral, exaone, one of the models, or the template text (default: the tokenizer "
                                           "source's; the fine-tunes' when it has none)")
    p.add_argument("--dtype", choices=DTYPES, help="output dtype (auto: the base's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (auto: a GPU when present)")
    p.add_argument("--max-shard-size", help="largest output shard, e.g. 5GB (default)")
    p.add_argument("--arithmetic", choices=["auto", "mergekit", "own"],
                   help="mergekit: mergekit 0.1.5's steps in the recipe's dtype, its bytes (auto: for a mergekit "
                        "recipe); own: hf-metagpt's float64 sums (auto: for our recipes)")
    p.add_argument("--seed", type=int, help="seed for methods that draw random numbers (DARE)")
    p.add_argument("--strict", action="store_true", default=None,
                   help="refuse LoRA adapters trained on another base (base_model_name_or_path); default: warn")
    p.add_argument("--output-format", choices=["model", "lora"],
                   help="model: full weights (default); lora: one merged adapter (all inputs LoRA adapters)")
    p.add_argument("--lora-rank", type=int, metavar="K",
                   help="with --output-format lora: compress each module to rank K by truncated SVD")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="merge inputs with only pickle weights (pytorch_model*.bin): converted to safetensors "
                        "with torch's weights-only loader; a pickle that would run code is still refused")
    _add_mergekit_flags(p)
    if for_plan:
        return
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty output folder")
    p.add_argument("--allow-nonfinite", action="store_true", default=None, help="merge even if inputs hold NaN/Inf")
    p.add_argument("--push-to", metavar="ORG/NAME", help="push the merged model to this Hub repo")
    p.add_argument("--private", action="store_true", default=None, help="create the pushed repo private")
    p.add_argument("--create-pr", action="store_true", default=None, help="push as a pull request")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--commit-message", help="commit message of the push")
    p.add_argument("--low-disk", action="store_true", default=None,
                   help="fetch Hub shards as the layer walk needs them and delete them after use")
    p.add_argument("--num-processes", type=int, metavar="N",
                   help="split the merge over N processes (runs `accelerate launch`; each process writes its "
                        "share of the shards; the output is the same bytes)")
    p.add_argument("--workers", metavar="N",
                   help="compute threads per process (default: from the cores, free memory and device; "
                        "also HF_METAGPT_WORKERS); the output is the same bytes for any N")


def _parse_value(key: str, text: str):
    """A --param value as YAML (`0.5`, `1e-9`, `[0.5, 0.5]`, `true`); a malformed one is a user error."""
    import yaml

    from .options import load_yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise MergeError(f"Bad --param value for {key!r}: {text!r} ({problem}).",
                         hint="Use a number, true/false, a string or a list such as "
                              "--param weights=[0.5,0.5] (quote it in the shell).") from None


def options_from_args(args: argparse.Namespace, for_merge: bool = True):
    """The MergeOptions of a parsed `merge`/`plan` command line (recipe, flags, --param)."""
    import dataclasses

    from .options import MergeOptions, build_options

    params = None
    if args.param:
        params = {}
        for item in args.param:
            if "=" not in item:
                raise MergeError(f"Bad --param {item!r}.", hint="Use --param KEY=VALUE, e.g. --param density=0.5.")
            key, value = item.split("=", 1)
            params[key.strip()] = _parse_value(key.strip(), value)
    _refuse_mergekit_flags(args)
    models = _recipe_given_as_model(args, for_merge)
    # Every flag whose destination is a MergeOptions field is an override (None: not given); the
    # parser is the one list of options (models and --param are read above).
    fields = {f.name for f in dataclasses.fields(MergeOptions)} - {"models", "parameters"}
    overrides = {n: v for n, v in vars(args).items() if n in fields}
    overrides["models"] = models or None
    overrides["parameters"] = params
    return build_options(args.recipe, getattr(args, "recipe_format", "auto"), for_merge=for_merge, **overrides)


_options_from_args = options_from_args  # the name tests and older callers use


#: mergekit-yaml's flags that people bring along: each gets an answer instead of "unrecognized arguments"
_MERGEKIT_FLAGS = {
    "allow_crimes": ("--allow-crimes",
                     "--allow-crimes (mergekit: merge models of different architectures) has no equivalent here.",
                     "hf-metagpt merges fine-tunes of one base: task vectors are differences of the same tensors, "
                     "so every input must have the base's architecture and shapes. Drop the flag."),
    "trust_remote_code": ("--trust-remote-code",
                          "--trust-remote-code is not needed: hf-metagpt never runs a model's code (it reads "
                          "config.json and the weights' headers and tensors only).",
                          "Drop the flag."),
    "out_shard_size": ("--out-shard-size",
                       "--out-shard-size is mergekit's flag and counts parameters (5B: 5 billion).",
                       "Use --max-shard-size with a size in bytes: 5GB (the default), or 10GB for 5 billion "
                       "bfloat16 parameters per shard."),
}


def _add_mergekit_flags(p: argparse.ArgumentParser) -> None:
    for dest, (flag, *_rest) in _MERGEKIT_FLAGS.items():
        if dest == "out_shard_size":
            p.add_argument(flag, dest=dest, help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=dest, action="store_true", help=argparse.SUPPRESS)


def _refuse_mergekit_flags(args: argparse.Namespace) -> None:
    for dest, (_flag, message, hint) in _MERGEKIT_FLAGS.items():
        if getattr(args, dest, None) not in (None, False):
            raise MergeError(message, hint=hint)


def _recipe_given_as_model(args: argparse.Namespace, for_merge: bool) -> list[str]:
    """The positional models; `merge RECIPE.yml OUT` (mergekit-yaml's order) is read as --recipe/-o."""
    from pathlib import Path

    models = list(args.models)
    recipes = [m for m in models if m.lower().endswith((".yml", ".yaml")) and Path(m).is_file()]
    if not recipes:
        return models
    alone = models[0] == recipes[0] and args.recipe is None and args.base is None
    if alone and (models[1:] == [] or (for_merge and len(models) == 2 and args.output is None)):
        args.recipe = models[0]
        if len(models) == 2:
            args.output = models[1]
        log.info("note: read %s as the recipe%s (mergekit-yaml's order; --recipe and -o say it explicitly)",
                 models[0], f" and {models[1]} as the output" if len(models) == 2 else "")
        return []
    out = " -o OUT" if for_merge else ""
    raise MergeError(f"{recipes[0]} is a recipe file, given where the models go.",
                     hint=f"Use --recipe {recipes[0]}{out} (mergekit-yaml's `merge RECIPE.yml OUT` also works, "
                          "with nothing else but flags).")


def _cmd_merge(args: argparse.Namespace) -> int:
    opts = options_from_args(args)  # options a merge cannot run with are refused before torch is imported
    if args.num_processes in (None, 1) and opts.layers is None:
        from .engine.distributed import launched_processes
        from .engine.readahead import start, two_pass

        if launched_processes() == 1:  # the disk reads the first pieces while torch is imported
            start([opts.base, *opts.models], cached_reads=two_pass(opts.method, opts.granularity))
    from .api import merge
    from .engine.distributed import disconnect, is_main_process, launched_processes

    if getattr(args, "workers", None) is not None:
        from .engine.sizing import parse_override

        os.environ[WORKERS_ENV] = str(parse_override(args.workers, "--workers"))
    if args.num_processes is not None and args.num_processes != 1:
        return _launch(args, opts)
    # This process exists for one merge: what the imports built (torch's modules: about a million
    # objects) lives until it exits, so the cyclic collector stops rescanning it in every full
    # collection (perf: 6-7 % of a warm 1.1B merge's CPU before, 3 % after).
    gc.freeze()
    try:
        result = merge(opts, progress=not args.quiet)
    finally:
        if launched_processes() > 1:
            disconnect()
    if is_main_process():  # under accelerate launch: printed once
        print(result.summary())
        if getattr(args, "verbose", False) and result.timeline is not None:
            print(result.timeline.line())
    return 0


def _launch(args: argparse.Namespace, opts) -> int:
    """`merge --num-processes N`: this same command again under `accelerate launch` in N processes."""
    import socket
    import subprocess

    from .engine.distributed import check_supported

    n = args.num_processes
    if n < 1:
        raise MergeError(f"--num-processes {n}: give at least 1.")
    check_supported(opts.output_format, opts.low_disk)
    argv = child_argv(args.argv)
    if opts.device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and n > gpus:
            raise MergeError(f"--num-processes {n} is more than the {gpus} GPU(s) here (one process per GPU).",
                             hint=f"Use --num-processes {gpus}, or --device cpu.")
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if opts.token:
        # The children read the token from their environment: a command line is readable by every
        # user of the machine (/proc/PID/cmdline, ps), an environment only by the same user.
        env["HF_TOKEN"] = opts.token
    if "OMP_NUM_THREADS" not in env:
        # torchrun would give each process one thread; the unfused paths (metagpt_dare/ties, LoRA
        # inputs) reduce norms with torch's threaded kernels, whose last bits follow the thread
        # count: keep the count one process uses here, so the output stays the same bytes.
        import torch

        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    # accelerate's --multi_gpu launcher is torchrun: on a machine without GPUs (or with --device cpu)
    # the processes connect over gloo (`distributed.connect`).
    # `accelerate launch`, through a wrapper that turns a failed process into an exit code instead
    # of the launcher's traceback (the process has printed its error already).
    cmd = [sys.executable, "-m", "hf_metagpt._launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "hf_metagpt", *argv]
    return subprocess.call(cmd, env=env)


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line for each launched process: without --num-processes and without the token.

    argparse accepts `--token X` and `--token=X` (no shorter prefix: `--tok` is ambiguous with
    `--tokenizer-source`); anything after a bare `--` is positional and kept.
    """
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--":
            out.extend(argv[i:])
            break
        elif a in ("--num-processes", "--token"):
            skip = True
        elif not a.startswith(("--num-processes=", "--token=")):
            out.append(a)
    return out


def _cmd_plan(args: argparse.Namespace) -> int:
    opts = options_from_args(args, for_merge=False)  # refused before torch is imported
    from .api import plan

    print(plan(opts).describe())
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .options import check_repo_id

    check_repo_id(args.repo_id, "repo ID", "repo_id")
    from .publish.push import push

    url = push(args.folder, args.repo_id, token=args.token, private=args.private, create_pr=args.create_pr,
               revision=args.revision, commit_message=args.commit_message)
    print(url)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(args.workdir, progress=not args.quiet)


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.against is not None and len(args.against) < 2:
        raise MergeError("--against needs the base and every fine-tune, in the merge's order.",
                         hint="e.g. hf-metagpt verify merged/ --against base/ chat/ math/")
    from .evaluation.verify import verify

    print(verify(args.folder, against=args.against, samples=args.samples, seed=args.seed).summary())
    return 0


def _cmd_install_extension(args: argparse.Namespace) -> int:
    from .extension import install_extension

    path = install_extension(force=args.force)
    print(f"Registered with the hf CLI: `hf metagpt ...` now runs {path}")
    return 0


def _hub_port(text: str) -> int:
    """`--port`: 0 (a free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0 picks a free one)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535; 0 picks a free one)")
    return port


def _hub_tokens(args: argparse.Namespace) -> dict[str, str]:
    """{token: user} from --token, --token-file and HF_METAGPT_HUB_TOKENS (the last two keep tokens out of
    the process's command line, which every local user can read)."""
    from pathlib import Path

    from .localhub import parse_token_spec

    specs = [(spec, "--token") for spec in args.token]
    for path in args.token_file:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MergeError(f"Cannot read --token-file {path}: {getattr(exc, 'strerror', None) or exc}.",
                             hint="Give a text file with one USER:TOKEN (or TOKEN) per line.") from None
        specs += [(line.strip(), f"--token-file {path}, line {i}") for i, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    specs += [(spec, HUB_TOKENS_ENV) for spec in (env_value(HUB_TOKENS_ENV) or "").replace(",", " ").split()]
    tokens = {}
    for spec, where in specs:
        try:
            token, user = parse_token_spec(spec)
        except ValueError:  # the message would repeat the token: name where it came from instead
            raise MergeError(f"A token spec in {where} is not TOKEN or USER:TOKEN.",
                             hint="Write TOKEN or USER:TOKEN (USER: letters, digits, '-', '_', '.').") from None
        tokens[token] = user
    return tokens


def _cmd_hub_serve(args: argparse.Namespace) -> int:
    import ssl
    from pathlib import Path

    from .localhub import LocalHub, is_loopback

    tokens = _hub_tokens(args)
    if bool(args.cert) != bool(args.key):
        raise MergeError("--cert and --key go together.", hint="Pass both PEM files to serve HTTPS, or neither.")
    for flag, path in (("--cert", args.cert), ("--key", args.key)):
        if path and not Path(path).is_file():
            raise MergeError(f"The {flag} file {path} does not exist (or is not a file).",
                             hint=f"Pass the path of a PEM file to {flag}.")
    data = Path(args.data)
    try:
        data.mkdir(parents=True, exist_ok=True)
        if not os.access(data, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise MergeError(f"Cannot keep the local Hub's data in --data {args.data}: {exc.strerror or exc}.",
                         hint="Choose a folder you can write to (it is created if missing).") from None
    if not is_loopback(args.host) and not args.cert:
        print(f"Warning: serving plain HTTP on {args.host}: tokens travel in clear over the network. "
              "Use --cert/--key for HTTPS, or keep the default --host 127.0.0.1.", file=sys.stderr)
    hub = LocalHub(args.data, host=args.host, port=args.port, tokens=tokens,
                   tls=(args.cert, args.key) if args.cert else None)
    try:
        endpoint = hub.start()
    except ssl.SSLError as exc:
        raise MergeError(f"Could not load --cert {args.cert} with --key {args.key}: {exc.reason or exc}.",
                         hint="Pass a PEM certificate and its matching PEM private key.") from None
    except OSError as exc:  # address in use, a host that is not ours
        raise MergeError(f"Could not serve on {args.host}:{args.port}: {exc.strerror or exc}.",
                         hint="Pick another --port (0 picks a free one), or a --host of this machine.") from None
    users = ", ".join(sorted(set(tokens.values()))) or "nobody (read-only: add --token USER:TOKEN)"
    try:  # serving from here on: a Ctrl-C as soon as the banner shows stops the Hub too
        print(f"Local Hub serving {args.data} at {endpoint}; tokens accepted for: {users}", file=sys.stderr)
        print("Set these where the client runs, before huggingface_hub is imported:", file=sys.stderr)
        print(f"export HF_ENDPOINT={endpoint}")
        print("export HF_HUB_DISABLE_XET=1", flush=True)
        hub.serve_forever()
    except KeyboardInterrupt:
        hub.stop()
        print("Local Hub stopped.", file=sys.stderr)
    return 0


# ==== eval / compare (issue [methods]) ============================================================
def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise MergeError(f"Bad {flag} {item!r}.", hint=f"Use {flag} NAME=MODEL, e.g. {flag} math=math-ft/.")
        out[key.strip()] = value.strip()
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import evaluate

    task_models = _pairs(args.task_model, "--task-model")
    if args.ald and not task_models:
        raise MergeError("--ald needs the fine-tune of each task.", hint="Add --task-model NAME=MODEL per --task.")
    models = {"base": args.base} if args.base else {}
    models.update({m: m for m in args.models})
    if not models:
        raise MergeError("No model to evaluate.", hint="Pass one or more model folders or Hub IDs.")
    roles = {"base": "base"} if args.base else {}
    table = evaluate(models, args.task, max_samples=args.max_samples, batch_size=args.batch_size,
                     device=args.device, dtype=args.dtype, task_models=task_models or None, roles=roles,
                     progress=not args.quiet)
    print(table.to_markdown())
    if args.plot:
        print(f"Plot: {table.plot(args.plot)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import (
        CompareSettings,
        compare,
        load_compare_recipe,
        parse_methods,
        parse_tasks,
    )

    values, settings = load_compare_recipe(args.recipe) if args.recipe else ({}, CompareSettings())
    for key in ("base", "granularity", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.models:
        values["models"] = list(args.models)
    if args.methods:
        settings.methods = parse_methods(args.methods)
    if args.task:
        settings.tasks = parse_tasks(args.task)
    settings.task_models.update(_pairs(args.task_model, "--task-model"))
    if args.max_samples is not None:
        settings.max_samples = args.max_samples
    if args.batch_size is not None:
        settings.batch_size = args.batch_size
    result = compare(values, settings, keep=args.keep, plot=args.plot, card=args.card, device=args.device,
                     progress=not args.quiet)
    print(result.to_markdown())
    if result.plot:
        print(f"\nPlot: {result.plot}")
    if args.keep:
        print(f"Merges kept in: {args.keep}")
    if result.card:
        print(f"Card updated: {result.card}")
    return 0


def _add_eval_parsers(sub) -> None:
    p = sub.add_parser("eval", help="per-task loss (and exact match, ALD) of models on datasets",
                       description="Mean token loss of each model on each task (exact match for prompt/answer "
                                   "data); with --ald, the average loss difference to each task's fine-tune.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="models to evaluate: local folders or Hub IDs")
    p.add_argument("--task", action="append", required=True, metavar="NAME=DATASET[:split][:field]",
                   help="a data file (.jsonl/.json/.csv/.parquet/.txt), folder or Hub dataset ID; records hold "
                        "`text`, or `prompt` + `answer` (field: COLUMN or PROMPT,ANSWER); repeatable")
    p.add_argument("--task-model", action="append", default=[], metavar="NAME=MODEL",
                   help="the fine-tune of task NAME (for ALD); repeatable")
    p.add_argument("--ald", action="store_true", help="print ALD: needs --task-model for every task")
    p.add_argument("--base", help="also evaluate the base model (a reference row)")
    p.add_argument("--max-samples", type=int, metavar="N", help="first N records of each task")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward pass (default 8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: a GPU when present")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: float32 on CPU, the stored dtype on GPU")
    p.add_argument("--plot", metavar="PNG", help="also save a bar plot of the losses")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="merge with several methods and compare per-task loss and ALD",
                       description="Merge the recipe's models with each method, evaluate base, fine-tunes and "
                                   "merges on the tasks, print a table (loss per task, ALD) and save a plot.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="fine-tunes (default: the recipe's)")
    p.add_argument("--recipe", help="merge recipe, optionally with a `compare:` section (tasks, methods, ...)")
    p.add_argument("--base", help="the base model (default: the recipe's)")
    p.add_argument("--methods", help="comma-separated methods (default: metagpt,linear,task_arithmetic,ties,dare_linear)")
    p.add_argument("--task", action="append", default=[], metavar="NAME=DATASET[:split][:field]",
                   help="evaluation task (replaces the recipe's); repeatable")
    p.add_argument("--task-model", action="append", default=[], metavar="NAME=MODEL",
                   help="the fine-tune of task NAME (default: the fine-tune whose folder is named NAME)")
    p.add_argument("--granularity", choices=["model", "layer", "tensor"], help="for the MetaGPT methods")
    p.add_argument("--seed", type=int, help="seed of the DARE methods")
    p.add_argument("--keep", metavar="DIR", help="keep the merges in DIR/METHOD (default: a temporary folder)")
    p.add_argument("--plot", metavar="PNG", help="plot file (default: DIR/compare.png with --keep, else compare.png)")
    p.add_argument("--card", metavar="DIR|METHOD", help="append the table to this merge's README.md")
    p.add_argument("--max-samples", type=int, metavar="N", help="first N records of each task")
    p.add_argument("--batch-size", type=int, metavar="B", help="sequences per forward pass (default 8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: a GPU when present")
    p.set_defaults(func=_cmd_compare)
# ==== end eval / compare ==========================================================================


# ==== inspect =====================================================================================
def _add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="task-vector norms, shares, cosines and λ of the inputs (one pass, writes nothing)",
                       description="Stream the inputs once and show, per block (and each tensor outside the blocks) and "
                                   "for the whole model: squared task-vector norms, each model's share, pairwise "
                                   "cosines and the λ each granularity would give; warns where task vectors overlap "
                                   "(MetaGPT assumes they are orthogonal). Nothing is written.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="fine-tunes or LoRA adapters: local folders or Hub IDs")
    p.add_argument("--base", help="the base model the fine-tunes were trained from")
    p.add_argument("--recipe", help="take base, models and options from a merge recipe (flags override it)")
    p.add_argument("--granularity", choices=["model", "layer", "tensor"],
                   help="the granularity you plan to merge with (the advice depends on it; default model)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument("--plot", metavar="DIR", help="also write the pictures (λ bars, per-layer shares, cosines) into DIR")
    p.add_argument("--tokenizer-source", help="as for merge: whose vocabulary rows count (default: the base's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="compute device (auto: a GPU when present)")
    p.add_argument("--strict", action="store_true", default=None, help="refuse LoRA adapters trained on another base")
    p.add_argument("--low-disk", action="store_true", default=None,
                   help="fetch Hub shards as the walk needs them and delete them after use")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .inspect_api import describe, inspect

    given = dict(base=args.base, models=args.models or None, recipe=args.recipe, granularity=args.granularity,
                 token=args.token, low_disk=args.low_disk, device=args.device, strict=args.strict,
                 tokenizer_source=args.tokenizer_source)
    result = inspect(progress=not args.quiet, **{k: v for k, v in given.items() if v is not None})
    if args.plot:
        for path in result.plot(args.plot).values():
            log.info("wrote %s", path)
    if args.json:
        for w in result.warnings:  # stdout is the JSON object; the warnings also reach the terminal
            log.warning("warning: %s", w)
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(describe(result))
    return 0
# ==== end inspect =================================================================================


def _version() -> str:
    from ._version import __version__

    return __version__


def _methods_epilog() -> str:
    """`merge --help`'s list of methods (one line each, from their docstrings) and examples."""
    from .methods import METHODS, summary

    width = max(map(len, METHODS)) + 2
    lines = ["methods (--method NAME; a wrong --param names the ones the method takes):"]
    lines += [f"  {name:<{width}}{summary(name)}" for name in METHODS]
    lines += ["", "examples:",
              "  hf-metagpt merge chat/ math/ --base base/ -o merged/",
              "  hf-metagpt merge org/chat org/math --base org/base -o merged/ --method ties --param density=0.5",
              "  hf-metagpt merge --recipe recipe.yml -o merged/        (a mergekit recipe works too)"]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose epilog may be a function called only when the help is printed:
    `merge --help`'s method list imports the methods (and torch), which `--version` and a
    refusal of bad options do not need."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-metagpt",
        description="Merge fine-tuned LLMs with MetaGPT, streamed layer by layer, and publish them.",
    )
    parser.add_argument("--version", action="version", version=f"hf-metagpt {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", "-q", action="store_true", help="print the result only: no progress bars, no notes")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also the libraries' messages (each HTTP request; signed URLs and tokens are masked)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("merge", help="merge a base and its fine-tunes", description="Merge a base model and fine-tunes.",
                       epilog=_methods_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_merge_args(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("plan", help="check inputs and show what a merge would read and write (downloads no weights)")
    _add_merge_args(p, for_plan=True)
    p.set_defaults(func=_cmd_plan)
    _add_inspect_parser(sub)

    p = sub.add_parser("install-extension", help="register this installation with the `hf` CLI as `hf metagpt`")
    p.add_argument("--force", action="store_true", help="replace an existing registration")
    p.set_defaults(func=_cmd_install_extension)

    p = sub.add_parser("push", help="upload a merged model folder to the Hub (one commit) and print its URL",
                       description="Upload a merged model folder to the Hub as one commit; creates the repo if missing.")
    p.add_argument("folder", help="the output folder of a merge")
    p.add_argument("repo_id", metavar="ORG/NAME", help="Hub repo to push to")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--commit-message", help="commit message")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("demo", help="offline demo: local Hub, tiny models merged by ID, pushed with a card",
                       description="Start a local Hub, publish a tiny base and three fine-tunes, merge them by ID, "
                                   "push the merge with its model card, and show where everything is. No internet.")
    p.add_argument("--workdir", help="folder for the demo's Hub data and outputs (default: a new temporary folder)")
    p.set_defaults(func=_cmd_demo)

    # Further subcommands (hub serve, push, verify, eval, compare) register below.
    _add_eval_parsers(sub)
    p = sub.add_parser("verify", help="re-read a merged folder and check it is whole (and, with --against, correct)",
                       description="Check a merged folder: index, shard headers, shapes, dtypes, total_size and "
                                   "finiteness; with --against BASE MODEL..., recompute a sample of tensors.")
    p.add_argument("folder", metavar="DIR", help="the merged model folder")
    p.add_argument("--against", nargs="+", metavar="MODEL", help="the base then the fine-tunes, in the merge's order: local folders, or Hub IDs whose files are in the Hub cache")
    p.add_argument("--samples", type=int, default=8, help="tensors to recompute with --against (default 8; a large number: all)")
    p.add_argument("--seed", type=int, default=0, help="which tensors are sampled")
    p.set_defaults(func=_cmd_verify)

    hub = sub.add_parser("hub", help="a local Hub-compatible server (tests, offline demos)")
    hub_sub = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")
    hub.set_defaults(func=lambda _args: hub.print_help() or 2)
    p = hub_sub.add_parser("serve", help="serve a local Hugging Face Hub-compatible API until Ctrl-C",
                           description="Serve a local Hugging Face Hub-compatible API until Ctrl-C.")
    p.add_argument("--data", default="hub-data", help="folder keeping repos and files (default: ./hub-data)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_hub_port, default=0, help="port, 0-65535 (default: a free one)")
    p.add_argument("--token", action="append", default=[], metavar="[USER:]TOKEN",
                   help="accept this token (for USER, default 'user'); repeatable; never printed. Other local "
                        "users can read a command line: prefer --token-file or HF_METAGPT_HUB_TOKENS")
    p.add_argument("--token-file", action="append", default=[], metavar="FILE",
                   help="accept the tokens in FILE: one [USER:]TOKEN per line ('#' comments); repeatable")
    p.add_argument("--cert", help="TLS certificate file (PEM): serve HTTPS; needs --key")
    p.add_argument("--key", help="TLS private key file (PEM) for --cert")
    p.set_defaults(func=_cmd_hub_serve)

    # `-q` also after the subcommand (`hf-metagpt merge ... -q`); SUPPRESS keeps a `-q` given before it.
    for name, sp in sub.choices.items():
        if name != "hub":
            sp.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                            help="print the result only: no progress bars, no notes")
            sp.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                            help="also the libraries' messages (each HTTP request; signed URLs masked)")
    return parser


def _os_error_text(exc: OSError) -> str:
    """One line naming the path and what is wrong with it."""
    from pathlib import Path

    where = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    if isinstance(exc, PermissionError):
        return f"permission denied for {where} ({exc.strerror})."
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and Path(str(exc.filename)).is_file():
        return f"{where} is a file, where a folder is needed."
    return f"cannot use {where}: {exc.strerror or exc}."


def exit_now(code: int) -> NoReturn:
    """End a CLI process with `code`, without the interpreter's teardown when nothing else runs.

    After a merge, Python's own teardown (clearing every module of torch, matplotlib and
    huggingface_hub, and a last cyclic garbage collection over their objects) took 0.27 s of
    each CLI run on a 2-core machine (median of 7 tiny merges; `gc.freeze()` first: 0.17 s; this
    way: 0.05 s). Here the atexit handlers run as at a normal exit (logging's flush, temporary
    folders, huggingface_hub's and torch's own), the standard streams are flushed, and the process
    ends (`os._exit`). Everything the CLI writes is closed (and synced where it must be) before
    `main` returns. While a non-daemon thread still runs (a library's pool not shut down), the
    normal exit joins it instead. Only for the CLI's own processes: `main` returns its code to
    callers and tests that run it in-process.
    """
    import atexit
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)  # CPython's; absent elsewhere: normal exit
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if run_exitfuncs is None or others:
        raise SystemExit(code)
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say to it
            pass
    os._exit(code)


def entry() -> NoReturn:
    """The `hf-metagpt` command (and `hf metagpt`, which runs it): `main`, then `exit_now`."""
    exit_now(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `merge --num-processes` runs it again
    from ._logging import configure_cli

    configure_cli(quiet=bool(getattr(args, "quiet", False)), verbose=bool(getattr(args, "verbose", False)),
                  debug=args.debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    # -q also silences huggingface_hub's own bars ("Parse safetensors files", fetch, upload).
    silenced = bool(getattr(args, "quiet", False)) and not are_progress_bars_disabled()
    if silenced:
        disable_progress_bars()
    try:
        return int(args.func(args) or 0)
    except MergeError as exc:
        from .errors import MainProcessStopped

        if args.debug:
            raise
        if not isinstance(exc, MainProcessStopped):  # the main process prints why
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout went away (`inspect --json | head -c 100`): nothing left to say to it.
        # stdout is pointed at /dev/null so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, as the shell reports a command whose pipe's reader stopped
    except OSError as exc:
        # A file the user named cannot be written or read (a read-only or full output parent, a
        # folder where a file should be): the path and the reason, not a traceback. An OSError
        # without a path is not the user's to fix: shown as the bug it is.
        if args.debug or exc.filename is None:
            raise
        print(f"error: {_os_error_text(exc)}\n  hint: check the path, or choose another --output; "
              "--debug shows where it happened.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if silenced:
            enable_progress_bars()


if __name__ == "__main__":
    raise SystemExit(main())
