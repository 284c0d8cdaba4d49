"""``lbw-policy`` command line: run | validate | verify | keygen | test | replay | audit | plot |
plugins | schema.

Each command parses its arguments and calls one module (the tools live in
:mod:`lbw_policy.policytest`, :mod:`lbw_policy.replay`, :mod:`lbw_policy.audit`,
:mod:`lbw_policy.plot`). No traceback reaches the user: every error a user can cause is printed
as ``error: ...`` (policy problems one per line, ``FILE:LINE: PATH: message``); an unexpected
one is printed the same way, with its traceback only when ``LBW_POLICY_DEBUG=1``.

Exit codes: 0 success; 1 a check failed (invalid policy, log that does not verify, a failing
policy test); 2 usage or input error (missing file, bad argument); 3 training was halted by the
policy; 4 an internal error (a bug: please report it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _cmd_run(args: argparse.Namespace) -> int:
    from lbw_policy.demo.train import TrainConfig, train

    config = TrainConfig(data=args.data, policy=args.policy, steps=args.steps, lr=args.lr, seed=args.seed,
                         device=args.device, out=args.out, batch_size=args.batch_size,
                         block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, warmup_steps=args.warmup_steps, progress=not args.no_progress,
                         nproc=args.nproc, sign_key=args.sign_key,
                         checkpoint_every=args.checkpoint_every,
                         witness=args.witness if args.witness is not None else
                         "-" if args.sign_key or os.environ.get("LBW_POLICY_SIGN_KEY") else None)
    summary = train(config)
    if summary.get("rank", 0) == 0:  # under torchrun, rank 0 reports for the run
        _print_run_summary(summary)
    return 3 if summary["halted"] else 0


def _print_run_summary(s: dict) -> None:
    from lbw_policy.progress import format_decisions

    print(f"run directory     {s['run_dir']}")
    print(f"policy            {s['policy']['name']} ({s['policy']['mode']}, revision {s['policy']['revision'][:12]})")
    gated = s.get("gated_steps") or 0
    skipped = f"{s['skipped_steps'] + gated} skipped" + (f" ({gated} on the device)" if gated else "")
    ranks = f" on each of {s['world_size']} ranks (DDP)" if s.get("world_size", 1) > 1 else ""
    print(f"steps             {s['steps_run']} run{ranks}, {skipped}, {s['steps_per_second']:.1f} steps/s")
    for title, key in (("final train loss", "final_train_loss"), ("final val loss", "final_val_loss")):
        value = s.get(key)
        print(f"{title:<18}" + ("- (no step was taken)" if value is None else f"{value:.4f} nats"))
    if s["halted"]:
        print(f"HALTED            {s['halted']['message']}")
    print(format_decisions(s))


def _cmd_validate(args: argparse.Namespace) -> int:
    from lbw_policy.errors import PolicyError
    from lbw_policy.policy import load_policy

    failed = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            failed += 1
            n = len(exc.problems)
            print(f"INVALID {path}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        except FileNotFoundError as exc:
            failed += 1
            print(f"INVALID {path}: {exc}", file=sys.stderr)
        else:
            print(f"ok {path}: {policy.name} (revision {policy.revision[:12]}, {len(policy.rules)} rules)")
    return 1 if failed else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from lbw_policy.decision_log import read_summary_anchor, verify_log
    from lbw_policy.signing import load_public_key

    path = Path(args.log)
    expected_count = expected_head = summary_error = None
    if path.is_dir():
        path = path / "decisions.jsonl"
    if not path.exists():
        print(f"error: no decision log at {path}", file=sys.stderr)
        return 2
    if (args.witness or args.run_id) and not args.public_key:
        print("error: --witness and --run-id check signatures: give --public-key FILE too",
              file=sys.stderr)
        return 2
    public_key = load_public_key(args.public_key) if args.public_key else None
    summary_file = path.parent / "summary.json"
    if not args.no_summary and (summary_file.exists() or summary_file.is_symlink()):
        try:
            expected_count, expected_head = read_summary_anchor(summary_file)
        except (ValueError, OSError) as exc:  # garbage, too large, a FIFO, unreadable
            summary_error = f"{summary_file}: {exc}"
    report = verify_log(path, expected_count=expected_count, expected_head=expected_head,
                        public_key=public_key, witness=args.witness, run_id=args.run_id,
                        summary_error=summary_error)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_keygen(args: argparse.Namespace) -> int:
    from lbw_policy.signing import generate_keypair

    key, pub, fp = generate_keypair(args.directory, args.name)
    print(f"private key  {key}  (mode 0600: keep it with the training job, never in the run "
          "directory)")
    print(f"public key   {pub}  (give it to whoever verifies: lbw-policy verify RUN "
          f"--public-key {pub})")
    print(f"fingerprint  {fp}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from lbw_policy.plugins import get_registry

    registry = get_registry()
    rows = []
    for kind, table in (("detector", registry.detectors), ("actuator", registry.actuators)):
        for name, reg in sorted(table.items()):
            extra = (", ".join(reg.cls.signals) if kind == "detector"
                     else ", ".join(reg.cls.commands) or "(none: always on)")
            row = {"kind": kind, "name": name, "plugin": reg.plugin, "version": reg.version,
                   "class": f"{reg.cls.__module__}.{reg.cls.__qualname__}",
                   ("signals" if kind == "detector" else "commands"): extra}
            if kind == "detector":  # how each signal reduces across ranks
                row["reductions"] = {s: reg.cls.reduction_for(s) for s in reg.cls.signals}
                optional = dict(getattr(reg.cls, "optional_signals", {}))
                if optional:        # emitted only with some params: which ones
                    row["optional_signals"] = optional
            rows.append(row)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'kind':<9} {'name':<18} {'plugin':<24} {'version':<9} "
          "signals (cross-rank reduction) / commands")
    for r in rows:
        what = (", ".join(f"{s} ({red})" for s, red in r["reductions"].items())
                if "reductions" in r else r["commands"])
        if r.get("optional_signals"):
            by_param: dict = {}
            for sig, param in r["optional_signals"].items():
                by_param.setdefault(param, []).append(sig)
            what += "".join(f"; with {param}: {', '.join(sigs)}" for param, sigs in by_param.items())
        print(f"{r['kind']:<9} {r['name']:<18} {r['plugin']:<24} {r['version']:<9} {what}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from lbw_policy.policy import policy_schema

    print(json.dumps(policy_schema(), indent=2))
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from lbw_policy.policytest import format_actual, format_results, run_test_file

    files = []
    for target in args.files:
        path = Path(target)
        found = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path]
        if path.is_dir() and not found:
            print(f"error: no *.yaml test files in {target}", file=sys.stderr)
            return 2
        files += found
    results = [run_test_file(f) for f in files]
    print(format_actual(results) if args.show else format_results(results))
    return 0 if all(r.passed for r in results) else 1


def _cmd_replay(args: argparse.Namespace) -> int:
    from lbw_policy.policy import resolve_policy_path
    from lbw_policy.replay import format_replay, replay, replay_json

    result = replay(args.run_dir, resolve_policy_path(args.policy))
    if args.format == "json":
        print(json.dumps(replay_json(result), indent=2, default=str))
    else:
        print(format_replay(result, all_steps=args.all, limit=args.limit))
    return 1 if args.strict and result.warnings else 0


def _split(values) -> list:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def _cmd_audit(args: argparse.Namespace) -> int:
    from lbw_policy import audit

    log = audit.load_audit(args.target)
    if args.explain is not None:
        try:
            ex = audit.explain(log, args.explain, policy_file=args.policy)
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
        if args.format == "text":
            print(audit.format_explanation(ex))
        else:
            print(json.dumps(ex, indent=2 if args.format == "json" else None, default=str))
        return 0
    filters = {"rule": _split(args.rule), "steps": args.steps, "event": _split(args.event),
               "actuator": _split(args.actuator)}
    records = audit.filter_records(log.records, rules=filters["rule"],
                                   steps=audit.parse_steps(args.steps), events=filters["event"],
                                   actuators=filters["actuator"])
    if args.format == "json":
        print(json.dumps(audit.audit_json(log, records, filters), indent=2))
    elif args.format == "jsonl":
        for row in audit.flat_rows(records):
            print(json.dumps(row, separators=(",", ":")))
    else:
        print(audit.format_audit(log, records, limit=args.limit, filters=filters,
                                 list_meta=bool(filters["event"])))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from lbw_policy.plot import plot_run

    signals = _split(args.signals) if args.signals else None
    plot_run(args.run_dir, args.output, signals=signals, title=args.title)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbw-policy", description=(
        "Declarative, auditable training-control governance for PyTorch."))
    from lbw_policy import __version__

    parser.add_argument("--version", action="version", version=f"lbw-policy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train the demo GPT under a policy and log every decision")
    run.add_argument("--data", default=None, help="text file to train on (default: the Python standard library's sources)")
    run.add_argument("--policy", default="default", help="policy file or built-in name (default: default)")
    run.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    run.add_argument("--steps", type=_positive_int, default=300, help="training steps (default: 300)")
    run.add_argument("--seed", type=int, default=0, help="seed for init and batch order (default: 0)")
    run.add_argument("--device", type=_device, default="cpu",
                     help="cpu, cuda or cuda:N (default: cpu)")
    run.add_argument("--out", default=None, help="run directory (default: runs/<time>-lr<lr>-s<seed>)")
    run.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    run.add_argument("--block-size", type=int, default=64, help="context length in characters (default: 64)")
    run.add_argument("--n-layer", type=int, default=2, help="transformer blocks (default: 2)")
    run.add_argument("--n-head", type=int, default=4, help="attention heads (default: 4)")
    run.add_argument("--n-embd", type=int, default=128, help="model width (default: 128)")
    run.add_argument("--warmup-steps", type=int, default=15, help="linear LR warm-up steps (default: 15)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--nproc", type=_positive_int, default=1,
                     help="train with DistributedDataParallel on N processes (gloo on the CPU, "
                          "one GPU each with --device cuda); rank 0 writes the run directory "
                          "(default: 1)")
    run.add_argument("--sign-key", metavar="FILE", default=None,
                     help="sign the decision log with this Ed25519 private key (lbw-policy keygen); "
                          "default: the file named by $LBW_POLICY_SIGN_KEY, else unsigned")
    run.add_argument("--witness", metavar="FILE", default=None,
                     help="when signing, also append each signed checkpoint to FILE, outside the "
                          "run directory (default: print them to stdout as JSON lines; - for stdout)")
    run.add_argument("--checkpoint-every", type=_positive_int, default=100, metavar="N",
                     help="when signing, a signed checkpoint every N records and at the end (default: 100)")
    run.set_defaults(func=_cmd_run)

    val = sub.add_parser("validate", help="validate policy files; non-zero exit on any error")
    val.add_argument("files", nargs="+", metavar="FILE")
    val.set_defaults(func=_cmd_validate)

    ver = sub.add_parser("verify", help="verify a decision log's hash chain and, with --public-key, its "
                         "signatures; exit 1 on any problem",
                         description="Verify a decision log. Unsigned: the hash chain (detects "
                         "accidents and naive edits). With --public-key: the log must be signed "
                         "by that key and end with a valid final checkpoint, which detects "
                         "rewrites, deletions, forgeries, splices, swaps and a cut tail "
                         "(docs/decision-log.md, Threat model).")
    ver.add_argument("log", metavar="FILE_OR_RUN_DIR")
    ver.add_argument("--no-summary", action="store_true", help="ignore the run's summary.json (record count and head hash)")
    ver.add_argument("--public-key", metavar="FILE", default=None,
                     help="Ed25519 public key (NAME.pub from lbw-policy keygen): check the signed checkpoints")
    ver.add_argument("--witness", metavar="FILE", default=None,
                     help="witness file of the run (its signed checkpoints, kept outside the run "
                          "directory): detects records cut from the end; needs --public-key")
    ver.add_argument("--run-id", metavar="RUN_ID", default=None,
                     help="the run the log must belong to (default: the log was signed in a "
                          "directory of the name it is in now); needs --public-key")
    ver.set_defaults(func=_cmd_verify)

    key = sub.add_parser("keygen", help="write an Ed25519 key pair to sign decision logs with",
                         description="Write DIR/NAME.key (private, mode 0600) and DIR/NAME.pub "
                         "(public). Existing files are never overwritten.")
    key.add_argument("directory", metavar="DIR")
    key.add_argument("--name", default="lbw-policy", help="file name stem (default: lbw-policy)")
    key.set_defaults(func=_cmd_keygen)

    tst = sub.add_parser("test", help="run policy unit tests (YAML); non-zero exit on any failure",
                         description="Run policy unit tests: each test file names a policy and "
                         "cases of signal series with the decisions expected (docs/policy-testing.md).")
    tst.add_argument("files", nargs="+", metavar="TESTFILE", help="test files, or directories of them")
    tst.add_argument("--show", action="store_true",
                     help="print the decisions each case actually produces, as YAML to review and paste")
    tst.set_defaults(func=_cmd_test)

    rep = sub.add_parser("replay", help="evaluate another policy over a run's telemetry and show how its decisions differ",
                         description="Shadow evaluation: feed a run's recorded signals to another "
                         "policy (nothing trains) and compare its decisions with the ones taken.")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument("--policy", required=True, metavar="OTHER.yaml", help="the policy to replay (file or built-in name)")
    rep.add_argument("--all", action="store_true", help="show every step with a decision, not only the differing ones")
    rep.add_argument("--limit", type=int, default=200, help="most steps listed (0: all; default 200)")
    rep.add_argument("--format", choices=("text", "json"), default="text")
    rep.add_argument("--strict", action="store_true",
                     help="exit 1 on any warning (a rule reads a signal the run never recorded, "
                          "a damaged telemetry line)")
    rep.set_defaults(func=_cmd_replay)

    aud = sub.add_parser("audit", help="summarize, filter and explain a run's decisions",
                         description="Read a decision log: summary tables by rule, actuator and "
                         "event; filtered decision lists; one decision explained in full.")
    aud.add_argument("target", metavar="RUN_DIR|decisions.jsonl")
    aud.add_argument("--rule", action="append", metavar="NAME", help="only this rule (repeat or comma-separate)")
    aud.add_argument("--steps", metavar="A:B", help="only steps A to B inclusive (A:, :B and A work too)")
    aud.add_argument("--event", action="append", metavar="EVENT",
                     help="only these events: fired, action, resolved, recover, halt, error, run_start, run_end, resume")
    aud.add_argument("--actuator", action="append", metavar="NAME", help="only decisions acting on this actuator")
    aud.add_argument("--explain", metavar="DECISION_ID", help="explain one decision (its id, e.g. run1.42, or seq)")
    aud.add_argument("--policy", metavar="FILE", help="policy file for --explain (default: the run's policy.yaml)")
    aud.add_argument("--limit", type=int, default=50, help="most decisions listed (0: all; default 50)")
    aud.add_argument("--format", choices=("text", "json", "jsonl"), default="text",
                     help="text (default), json (one document) or jsonl (one flat row per action)")
    aud.set_defaults(func=_cmd_audit)

    plo = sub.add_parser("plot", help="plot loss, learning rate and signals over steps, with decisions marked")
    plo.add_argument("run_dir", metavar="RUN_DIR")
    plo.add_argument("-o", "--output", default="timeline.png", metavar="FILE.png", help="image file (default timeline.png)")
    plo.add_argument("--signals", action="append", metavar="NAME",
                     help="signals to plot (repeat or comma-separate; default: those the rules read)")
    plo.add_argument("--title", default=None)
    plo.set_defaults(func=_cmd_plot)

    plug = sub.add_parser("plugins", help="list every detector and actuator with its plugin and version")
    plug.add_argument("--format", choices=("table", "json"), default="table")
    plug.set_defaults(func=_cmd_plugins)

    sch = sub.add_parser("schema", help="print the policy JSON Schema (for editors)")
    sch.set_defaults(func=_cmd_schema)
    return parser


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {value}")
    return value


def _device(text: str) -> str:
    """argparse type: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, found {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device "
                                         "(torch.cuda.is_available() is False)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, found {text!r}")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    from lbw_policy.errors import DecisionLogError, PluginError, PolicyError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PolicyError as exc:
        print(f"error: invalid policy\n{exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `lbw-policy audit RUN | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PluginError, DecisionLogError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so in one line, traceback only on request
        if os.environ.get("LBW_POLICY_DEBUG"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc} (set LBW_POLICY_DEBUG=1 "
              "for the traceback, and please report it)", file=sys.stderr)
        return 4


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
