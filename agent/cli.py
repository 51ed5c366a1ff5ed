"""The ``or-agent`` command: one entry point, one subcommand per job.

This is the command-line layer: the argument parsers are built here (options shared with the
benchmarks in ``agent.options``), and so is the printing of what a command did. ``agent.certs``,
``agent.audit`` and ``calibration`` return values, raise ``OrAgentError`` or report through a ``log``
callback this layer passes in, and never write to the terminal themselves, so they can be used and
tested without one.

Every error or-agent raises on purpose (``pipelines.errors.OrAgentError``) is printed here
as one line, ``or-agent: error: ...``, with the error's exit code; a user's mistake never
shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from or_agent.agent.logs import FORMATS as LOG_FORMATS
from or_agent.agent.logs import LEVELS as LOG_LEVELS
from or_agent.agent.options import add_models_option
from or_agent.pipelines.errors import InputError, OrAgentError
from or_agent.pipelines.options import BACKENDS, FRAME_PATHS


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 854x480, got {text!r}") from None
    return w, h


def cmd_synth(args) -> int:
    from or_agent.agent.offline.progress import Progress
    from or_agent.synth.dataset import SynthConfig, write_dataset

    cfg = SynthConfig(videos=args.videos, seed=args.seed, time_scale=args.time_scale, width=args.size[0],
                      height=args.size[1], fps=args.fps, mask_every=args.mask_every, first_index=args.first_index)
    bars: dict[int, Progress] = {}

    def progress(video, of, frame, frames):
        bar = bars.get(video)
        if bar is None:
            bar = bars[video] = Progress(f"video {video}/{of}", frames)
        bar.update(frame + 1)
        if frame + 1 == frames:
            bar.close()

    metas = write_dataset(args.out, cfg, progress)
    for meta in metas:
        phases = " -> ".join(s["phase"] for s in meta["segments"])
        print(f"{Path(args.out) / meta['video']}: {meta['frames']} frames, {meta['frames'] / meta['fps']:.0f} s; {phases}")
    return 0


def cmd_evaluate_segmentation(args) -> int:
    from or_agent.agent.offline.evaluate import evaluate_segmentation

    scores = evaluate_segmentation(args.folder, args.models_dir, args.out, variant=args.variant)
    for line in scores.table():
        print(line)
    return 0


def cmd_evaluate_visibility(args) -> int:
    from or_agent.agent.offline.evaluate_visibility import evaluate_visibility

    groups = {"in-body": args.in_body, "clear": args.clear, "smoky": args.smoky, "out-of-body": args.out_of_body}
    scores = evaluate_visibility(groups, args.models_dir, every=args.every)
    for line in scores.table():
        print(line)
    return 0 if scores.all_measured_goals_met else 1


def cmd_evaluate_phase(args) -> int:
    from or_agent.agent.offline.evaluate_phase import evaluate_phase

    evaluation = evaluate_phase(args.folder, args.models_dir, args.out, variant=args.variant)
    for line in evaluation.table():
        print(line)
    return 0


def cmd_models(args) -> int:
    from or_agent.pipelines.manifest import SETS_ROOT, discover, load_manifest, resolve_models_dir, set_names
    from or_agent.pipelines.model_set import load_model_set

    if args.models_dir or os.environ.get("OR_AGENT_MODELS"):
        folders = [resolve_models_dir(args.models_dir)]
    else:
        folders = [SETS_ROOT / name for name in set_names()] or [resolve_models_dir(None)]
    problems = checked = 0
    for folder in folders:
        try:
            model_set = load_model_set(folder, verify=False)  # each model's sha256 is checked below
            rules = model_set.rules_file
            print(f"set   {model_set.name} {model_set.version} ({model_set.procedure}), licence {model_set.license}; "
                  f"rules {rules.name} checked against {len(model_set.class_names)} classes  [{folder}]")
            paths = [m.path for m in model_set.models]  # its own and those it shares with another set
        except OrAgentError as exc:
            print(f"FAIL  set {folder.name}: {exc}")
            problems += 1
            paths = discover(folder)
        if not paths:
            raise InputError(f"{folder}: no */manifest.json found")
        for path in paths:
            checked += 1
            try:
                m = load_manifest(path)
                m.verify_file()
            except OrAgentError as exc:
                print(f"FAIL  {exc}")
                problems += 1
                continue
            size = m.model_path.stat().st_size / 1e6
            shape = "x".join(str(d) for d in m.input.shape)
            metrics = ", ".join(f"{k}={v}" for k, v in m.metrics.items() if isinstance(v, (int, float)))
            print(f"ok    {m.name} {m.version} ({m.task}, {m.cadence}) input {m.input.name} {shape} {m.input_spec.color_order}, "
                  f"{len(m.labels)} labels, {size:.2f} MB, sha256 {m.sha256[:12]}, licence {m.license}  {metrics}")
    if problems:
        print(f"{problems} problem(s) in {len(folders)} model set(s) of {checked} models", file=sys.stderr)
        return 3
    return 0


def _model_store(args):
    """The store and trusted keys: ``--store`` / ``--trusted-key``, else the config's ``[models]``, else the defaults."""
    from or_agent.agent.config import load_config
    from or_agent.agent.model_store import ModelStore, default_store_dir

    settings = load_config(getattr(args, "config", None)).models
    store = args.store or settings.store or default_store_dir()
    trusted = list(getattr(args, "trusted_key", None) or settings.trusted_keys)
    return ModelStore(store), trusted


def cmd_models_install(args) -> int:
    store, trusted = _model_store(args)
    done = store.install(Path(args.set_dir), trusted_keys=trusted)
    how = f"signature verified with {done.signed_by}" if done.signed_by else "sha256 verified (no trusted key: signature not required)"
    if done.already_installed:
        print(f"{done.label} is already installed, identical: {done.path}")
    else:
        print(f"installed {done.label}: {how}  [{done.path}]")
    if store.active() is None:
        print(f"no set is active yet: or-agent models activate {done.label} --store {store.dir}")
    return 0


def cmd_models_activate(args) -> int:
    store, _ = _model_store(args)
    now, before = store.activate(args.label)
    print(f"active: {now}" + (f" (previous: {before})" if before and before != now else ""))
    print(f"the agent runs it with --models {store.active_path} (a running agent picks it up at its next start)")
    return 0


def cmd_models_rollback(args) -> int:
    store, _ = _model_store(args)
    now, before = store.rollback()
    print(f"rolled back: active {now} (previous: {before})")
    return 0


def cmd_models_list(args) -> int:
    store, _ = _model_store(args)
    sets = store.installed()
    if not sets:
        print(f"no model sets installed in {store.dir}")
        return 0
    for s in sets:
        state = "active" if s.active else "previous" if s.previous else ""
        print(f"{'*' if s.active else ' '} {s.label:<32} {'signed' if s.signed else 'unsigned':<8} {state}".rstrip())
    return 0


def cmd_models_sign(args) -> int:
    from or_agent.agent.model_signing import sign

    digests, signature = sign(Path(args.set_dir), Path(args.key))
    print(f"wrote {digests} and {signature}")
    return 0


def cmd_models_keygen(args) -> int:
    from or_agent.agent.model_signing import keygen

    pair = keygen(Path(args.out))
    print(f"{pair.private_key}  private signing key (mode 0600): keep it off the OR box")
    print(f"{pair.public_key}  public key: the box trusts it with models.trusted_keys or --trusted-key")
    return 0


def cmd_bundle(args) -> int:
    from or_agent.agent.bundle import Target, build_bundle

    target = Target(python_version=args.python_version, platform=args.platform)
    extras = [x.strip() for x in args.extras.split(",") if x.strip()]
    summary = build_bundle(Path(args.out), target, extras, log=print)
    for line in summary.not_bundled:
        print(f"not bundled: {line}")
    print(f"wrote {summary.out}: {summary.wheels} wheels, {summary.size_bytes / 1e6:.1f} MB, for {target.describe()} "
          f"(install on the box: {summary.out}/install.sh)")
    return 0


def cmd_demo(args) -> int:
    from or_agent.agent.offline.demo import run_demo

    return run_demo(out_dir=Path(args.out), seed=args.seed, time_scale=args.time_scale, models_dir=args.models_dir,
                    headless=args.headless)


def cmd_replay(args) -> int:
    from or_agent.agent.offline.replay import run_replay

    if args.anatomy_every is not None and args.anatomy_every < 1:
        raise InputError(f"--anatomy-every must be at least 1, got {args.anatomy_every}")
    if args.video_height == "source":
        video_height = None
    else:
        try:
            video_height = int(args.video_height)
        except ValueError:
            raise InputError(f"--video-height must be a number of pixels or 'source', got {args.video_height!r}") from None
    return run_replay(args.videos, args.out, labels=args.labels, masks=args.masks, paced=args.paced,
                      anatomy_every=args.anatomy_every, models_dir=args.models_dir, rules_file=args.rules,
                      time_scale=args.time_scale, video_out=args.video, video_height=video_height)


def cmd_archive_run(args) -> int:
    from or_agent.agent.archive.run import ArchiveOptions, run_archive

    options = ArchiveOptions(out=Path(args.out), ray_address=args.ray, models=args.models_dir, workers=args.workers,
                             retries=args.retries)
    return 1 if run_archive(args.sources, options).failures else 0


def cmd_archive_report(args) -> int:
    from or_agent.agent.archive.report import write_cohort_report

    report = write_cohort_report(args.dir, args.out)
    dest = Path(args.out or args.dir)
    print(f"cohort report of {report['cases']} cases ({len(report['failed'])} failed): {dest / 'cohort.html'}, "
          f"{dest / 'cohort.json'}, {dest / 'cases.csv'}")
    return 0


def _setup_logging(args, level: str = "warning", fmt: str = "text") -> None:
    """Log lines to standard error: ``--log-level`` / ``--log-format`` where given, else ``level`` and ``fmt``."""
    from or_agent.agent.logs import configure_logging

    configure_logging(getattr(args, "log_level", None) or level, getattr(args, "log_format", None) or fmt)


def cmd_serve(args) -> int:
    import asyncio

    from or_agent.agent.config import load_config
    from or_agent.agent.server import serve_forever

    overrides = {
        "server.listen": args.listen, "server.tls_cert": args.tls_cert, "server.tls_key": args.tls_key,
        "server.tls_ca": args.tls_ca, "server.insecure": True if args.insecure else None,
        "case.source": args.source, "case.case_id": args.case_id, "case.paced": args.paced,
        "pipeline.models": args.models_dir, "pipeline.backend": args.backend,
        "pipeline.preprocessing": args.preprocessing, "server.metrics_listen": args.metrics_listen,
        # so that a reload (SIGHUP) compares and applies the level in effect: the command line's wins
        "logging.level": getattr(args, "log_level", None), "logging.format": getattr(args, "log_format", None)}
    cfg = load_config(args.config).with_overrides(**overrides)
    _setup_logging(args, cfg.logging.level, cfg.logging.format)

    def reload_config():  # SIGHUP: the same file, the same command-line overrides
        return load_config(args.config).with_overrides(**overrides)

    return asyncio.run(serve_forever(cfg, reload_config if args.config else None))


def cmd_config_check(args) -> int:
    """``or-agent config check FILE``: ``FILE: OK`` and what it would run with, or one error line."""
    from or_agent.agent.config_check import check_config

    report = check_config(args.file)
    print(f"{args.file}: OK")
    for line in report.lines:
        print(f"  {line}")
    return 0


def _client_credentials(args):
    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise InputError("--tls-cert/--tls-key need --tls-ca (the CA that signed the agent's certificate)")
        return None
    from or_agent.agent.certs import channel_credentials

    return channel_credentials(Path(args.tls_ca), Path(args.tls_cert) if args.tls_cert else None,
                               Path(args.tls_key) if args.tls_key else None)


def _certificate_name(path: Path) -> str:
    from or_agent.agent.certs import PeerCertificate

    try:
        return PeerCertificate.from_pem(path.read_bytes()).name or "display"
    except (OSError, ValueError):
        return "display"  # the credentials' own check names the problem


def cmd_display(args) -> int:
    import asyncio

    from or_agent.agent.display import Display, has_screen

    _setup_logging(args, "info" if args.verbose else "warning")
    headless = args.headless
    if headless is None and not has_screen():
        headless = str(Path("out") / f"display-{args.client_id}.mp4")
        Path(headless).parent.mkdir(parents=True, exist_ok=True)
        print(f"no screen found: running headless, writing what the display shows to {headless}")
    client_id = args.client_id
    if client_id is None:  # under mutual TLS the agent knows a display by its certificate's name
        client_id = _certificate_name(Path(args.tls_cert)) if args.tls_cert else "display"
    d = Display(args.target, client_id=client_id, video=args.video, headless=headless, stale_ms=args.stale_ms,
                credentials=_client_credentials(args), duration_s=args.duration)
    code = asyncio.run(d.run())
    if headless:
        print(f"wrote {d.frames_shown} frames to {headless}")
    return code


def cmd_doctor(args) -> int:
    from or_agent.agent.offline.doctor import run_doctor

    certificates = list(args.certs or [])
    if args.config:  # the agent's own TLS files, and the displays' certificates made beside its CA
        from or_agent.agent.config import load_config

        server = load_config(args.config).server
        certificates += [p for p in (server.tls_cert, server.tls_ca) if p]
        if server.tls_ca and (Path(server.tls_ca).parent / "clients").is_dir():
            certificates += sorted((Path(server.tls_ca).parent / "clients").glob("*.crt"))
    return run_doctor(models_dir=args.models_dir, cache_dir=args.cache_dir, audit_dir=args.audit_dir,
                      probe_capture=not args.no_capture_probe, certificates=certificates)


def cmd_qualify(args) -> int:
    from or_agent.agent.offline.qualify import run_qualify

    return run_qualify(Path(args.out), clip=args.clip, models_dir=args.models_dir, backend=args.backend,
                       preprocessing=args.preprocessing, cuda_graphs=args.cuda_graphs,
                       budget_ms=args.budget_ms, seconds=args.seconds, frames=args.frames)


def cmd_build_engines(args) -> int:
    from or_agent.pipelines.backends import engines
    from or_agent.pipelines.gpu.context import gpu_info
    from or_agent.pipelines.manifest import discover, load_manifest

    cache = engines.EngineCache(Path(args.cache_dir) if args.cache_dir else engines.default_cache_dir())
    gpu, version = gpu_info(), engines.tensorrt_version()  # DependencyError: one line, exit 5
    manifests = [load_manifest(p) for p in discover(args.models_dir)]
    for m in manifests:
        m.verify_file()
        key = engines.EngineKey.for_model(m, gpu, version)
        if cache.has(key) and not args.force:
            print(f"ok    {m.name}: {cache.path_for(key).name}")
            continue
        timing = Path(args.timing_cache) if args.timing_cache else cache.timing_cache_path
        print(f"built {m.name}: {engines.build_engine(m, cache, key, timing).name}", flush=True)
    from or_agent.agent.model_store import ModelStore, default_store_dir

    # every set installed in the store keeps its engines, so `models rollback` needs no rebuild
    installed = ModelStore(args.store or default_store_dir()).model_sha256s()
    for p in cache.prune({m.sha256 for m in manifests} | installed, remove=args.prune):
        print(("removed " if args.prune else "stale   ") + p.name)
    return 0


def cmd_audit_verify(args) -> int:
    """``or-agent audit verify PATH...``: one line, exit 0 if the chain is intact, 1 if it is broken."""
    from or_agent.agent.audit.verify import verify

    result = verify([Path(p) for p in args.paths])
    if not result.ok:
        print(f"BROKEN: {result.first_error}")
        return 1
    notes = "".join(f"; {n}" for n in result.notes)
    print(f"ok: {result.records} records in {len(result.files)} files, chain intact{notes}")
    for w in result.warnings:
        print(f"warning: {w}")
    return 0


def cmd_audit_prune(args) -> int:
    """``or-agent audit prune DIR``: apply the retention settings now (while no agent writes DIR)."""
    from or_agent.agent.audit.chain import audit_files
    from or_agent.agent.audit.retention import RetentionPolicy, prune
    from or_agent.agent.audit.writer import AuditLog
    from or_agent.agent.config import load_config

    settings = load_config(args.config).audit
    days = settings.retention_days if args.days is None else args.days
    mb = settings.retention_mb if args.mb is None else args.mb
    if days < 0 or mb < 0:
        raise InputError(f"audit prune: --days and --mb must not be negative, got {days} and {mb}")
    directory = Path(args.directory or settings.directory)
    if not directory.is_dir() or not audit_files(directory):
        raise InputError(f"{directory}: no audit-*.jsonl files in this directory")
    policy = RetentionPolicy(days, mb)
    if not policy.enabled:
        print("nothing to do: no retention set (audit.retention_days and audit.retention_mb are 0; or --days / --mb)")
        return 0
    with AuditLog(directory, max_bytes=settings.max_bytes) as audit_log:
        done = prune(audit_log, policy)
    if not done.removed:
        print(f"nothing to prune in {directory} (retention {days} days, {mb} MB)")
        return 0
    print(f"removed {len(done.removed)} file(s), {done.freed_bytes / 1e6:.1f} MB: "
          f"{', '.join(p.name for p in done.removed)}; the chain now starts at record {done.first_seq} "
          "(recorded in the trail)")
    return 0


def _mode(path: Path) -> str:
    return f"{os.stat(path).st_mode & 0o777:04o}"


def cmd_certs(args) -> int:
    from or_agent.agent.certs import describe, make_certificates, stale_clients

    if not args.out or not args.box:
        raise InputError("certs: --out and --box are required (or: or-agent certs revoke NAME --out DIR)")
    made = make_certificates(Path(args.out), args.box, args.display or (), dns=args.dns or (), ips=args.ip or (),
                             ca_days=args.ca_days, cert_days=args.cert_days, force_new_ca=args.force_new_ca)
    print(f"{made.ca_cert}  {'new' if made.new_ca else 'kept'} {describe(made.ca_cert)}")
    print(f"{made.ca_key}  {'new' if made.new_ca else 'kept'} CA private key (mode {_mode(made.ca_key)})")
    print(f"{made.server_cert}  {describe(made.server_cert)}")
    print(f"{made.server_key}  server private key (mode {_mode(made.server_key)})")
    for crt, key in made.clients.values():
        print(f"{crt}  {describe(crt)}")
        print(f"{key}  display private key (mode {_mode(key)})")

    if not made.new_ca and os.stat(made.ca_key).st_mode & 0o077:
        print(f"warning: {made.ca_key} is readable by other users; chmod 600 it")
    for path in stale_clients(made):
        print(f"note: {path} was signed by a previous CA and will be refused; make it again with --display {path.stem}")

    print()
    print("The agent (gRPC server, mutual TLS):")
    print(f"  --tls-cert {made.server_cert} --tls-key {made.server_key} --tls-ca {made.ca_cert}")
    if made.clients:
        print("Each display: its own certificate and key, and the CA to trust the box, e.g.")
        crt, key = next(iter(made.clients.values()))
        print(f"  {crt} {key} {made.ca_cert}")
    print(f"Keep {made.ca_key} private (it can make certificates the agent trusts); "
          "it is needed only to make more of them.")
    return 0


def cmd_certs_revoke(args) -> int:
    """``or-agent certs revoke NAME --out DIR``: the agent refuses that display's certificates from then on."""
    from or_agent.agent.certs import revoke

    entry, path, found = revoke(Path(args.out), args.name)
    what = f"certificate serial {entry.serial:x} and every" if found else "every"
    print(f"revoked: {what} certificate issued to {entry.name} until {entry.revoked_at:%Y-%m-%d %H:%M:%S} UTC ({path})")
    if not found:
        print(f"note: no certificate of this CA at {Path(args.out) / 'clients' / (args.name + '.crt')}: revoked by name only")
    print("A running agent reads the list within a second and refuses the display's calls, ending its open streams;")
    print(f"to admit the display again, make it a new certificate: or-agent certs --out {args.out} --box BOX --display {args.name}")
    return 0


def _use_converted(out: str) -> None:
    print(f"use them with --models {out} (or OR_AGENT_MODELS={out}) once every task has a model there")


def cmd_calibrate_int8(args) -> int:
    from or_agent.calibration.common import fp32_model_names, require_onnx
    from or_agent.calibration.int8 import calibrate_int8

    require_onnx()
    if args.frames < 1:
        raise InputError(f"--frames must be at least 1, got {args.frames}")
    for name in fp32_model_names(args.model, args.models_dir):
        calibrate_int8(name, args.videos, out_dir=args.out, frames=args.frames, models_dir=args.models_dir, log=print)
    _use_converted(args.out)
    return 0


def cmd_calibrate_fp16(args) -> int:
    from or_agent.calibration.common import fp32_model_names, require_onnx
    from or_agent.calibration.fp16 import calibrate_fp16

    require_onnx()
    for name in fp32_model_names(args.model, args.models_dir):
        calibrate_fp16(name, out_dir=args.out, models_dir=args.models_dir, log=print)
    _use_converted(args.out)
    return 0


def cmd_calibrate_compare(args) -> int:
    from or_agent.calibration.compare import run_compare

    run_compare(args.videos, args.variants, models_dir=args.models_dir, write=not args.no_write, log=print)
    return 0


def cmd_calibrate_temperature(args) -> int:
    from or_agent.calibration.temperature import calibrate_temperature

    result = calibrate_temperature(args.videos, model=args.model, models_dir=args.models_dir, write=not args.dry_run,
                                   check=args.check, log=print)
    return 0 if result.get("check_passed", True) else 1


class _PrintVersion(argparse.Action):
    """``--version``: its line is made only when asked for (it reads the default model set's name)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from or_agent.agent.build_info import version_line

        print(version_line())
        parser.exit()


def add_log_options(parser: argparse.ArgumentParser, on_command: bool = False) -> None:
    """``--log-level`` and ``--log-format``: before the command (every command), or after it (where given,
    they win over the ones before)."""
    keep = {"default": argparse.SUPPRESS} if on_command else {}
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log this and above to standard error "
                        "(serve: config logging.level, default info; other commands: warning)", **keep)
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="text, or json: one object a line with the case id, "
                        "for journald and ELK (serve: config logging.format)", **keep)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="or-agent", description="Surgical video decision-support edge agent.")
    ap.add_argument("--version", action=_PrintVersion, help="print the version and the default model set, and exit")
    add_log_options(ap)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("synth", help="generate synthetic laparoscopic cholecystectomy videos with ground truth")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--videos", type=int, default=1, help="number of videos (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    p.add_argument("--time-scale", type=float, default=20.0,
                   help="divide real Cholec80 phase durations by this (default 20: a ~35 min surgery becomes ~1.7 min)")
    p.add_argument("--size", type=_size, default=(854, 480), help="frame size WIDTHxHEIGHT (default 854x480)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate (default 25)")
    p.add_argument("--mask-every", type=int, default=25, help="write a class mask every N frames (default 25)")
    p.add_argument("--first-index", type=int, default=1, help="number of the first video (videoNN; default 1)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("models", help="list the installed models and verify their manifests and sha256; "
                                      "install, activate and roll back versioned sets in the model store")
    add_models_option(p)
    p.set_defaults(func=cmd_models)
    models_sub = p.add_subparsers(dest="models_action", metavar="[ACTION]")  # none: list and verify, as before

    def store_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--store", help="the model store (default: config models.store, $OR_AGENT_MODEL_STORE, "
                                       "/var/lib/or-agent/models if it exists, else ~/.local/state/or-agent/models)")
        q.add_argument("--config", help="agent configuration (TOML) whose [models] table names the store and trusted keys")

    q = models_sub.add_parser("install", help="verify a model set (sha256, signature if keys are trusted) and copy it "
                                              "into the store as NAME@VERSION")
    q.add_argument("set_dir", metavar="SET_DIR", help="the set's folder (with model-set.json)")
    store_options(q)
    q.add_argument("--trusted-key", action="append", metavar="FILE",
                   help="ed25519 public key (PEM) the set must be signed with (repeatable; default: models.trusted_keys)")
    q.set_defaults(func=cmd_models_install)
    q = models_sub.add_parser("activate", help="make an installed set the active one; the old one is kept for rollback")
    q.add_argument("label", metavar="NAME@VERSION")
    store_options(q)
    q.set_defaults(func=cmd_models_activate)
    q = models_sub.add_parser("rollback", help="switch back to the set that was active before")
    store_options(q)
    q.set_defaults(func=cmd_models_rollback)
    q = models_sub.add_parser("list", help="the sets installed in the store, and which is active and previous")
    store_options(q)
    q.set_defaults(func=cmd_models_list)
    q = models_sub.add_parser("sign", help="write model-set.sha256 and its ed25519 signature model-set.sig into a set")
    q.add_argument("set_dir", metavar="SET_DIR")
    q.add_argument("--key", required=True, metavar="PRIVATE_KEY", help="the signing key (from `or-agent models keygen`)")
    q.set_defaults(func=cmd_models_sign)
    q = models_sub.add_parser("keygen", help="make an ed25519 signing key pair for model sets")
    q.add_argument("--out", required=True, metavar="DIR", help="where model-signing.key and model-signing.pub go")
    q.set_defaults(func=cmd_models_keygen)

    p = sub.add_parser("evaluate", help="score a model set on labelled real frames (segmentation: per-class IoU and "
                                        "Dice; phase: accuracy, precision, recall, Jaccard, strict and official)")
    evaluate_sub = p.add_subparsers(dest="evaluate_what", metavar="TASK")
    evaluate_sub.required = True
    e = evaluate_sub.add_parser("segmentation", help="the set's segmentation model on an Endoscapes-format folder "
                                                     "(images/, masks/ with class ids, 255 ignored)")
    e.add_argument("folder", metavar="DIR", help="folder with images/ and masks/ (e.g. endoscapes-seg50/val)")
    add_models_option(e)
    e.add_argument("--out", help="write the class maps (PNG) and predictions.csv here")
    e.add_argument("--variant", metavar="MODEL_DIR",
                   help="score this model folder (e.g. an FP16 or INT8 one from `or-agent calibrate`) in place of the "
                        "set's segmentation model, with the set's rules")
    e.set_defaults(func=cmd_evaluate_segmentation)
    e = evaluate_sub.add_parser("phase", help="the set's phase model on frames labelled with their phase, in time order "
                                              "(a folder with phase.csv: image, second, phase; or a folder of them)")
    e.add_argument("folder", metavar="DIR", help="a video's frames with phase.csv, or a folder of such folders "
                                                 "(e.g. cholect50-val)")
    add_models_option(e)
    e.add_argument("--out", help="write predictions.csv (per frame: the phase shown, the model's own, the confidence) "
                                 "and phase_eval.json (every figure) here")
    e.add_argument("--variant", metavar="MODEL_DIR",
                   help="score this phase model folder (with the same phases) in place of the set's phase model")
    e.set_defaults(func=cmd_evaluate_phase)
    e = evaluate_sub.add_parser("visibility", help="the set's visibility model (the gate) on in-body, clear, smoky and "
                                                   "out-of-body frames: its verdict rates and goals (default: the real data)")
    for flag, what in (("--in-body", "frames inside the patient (none may be called out of body)"),
                       ("--clear", "clear views (none should be called low visibility)"),
                       ("--smoky", "frames with surgical smoke (all should be called low visibility)"),
                       ("--out-of-body", "frames outside the patient (all should be called out of body)")):
        e.add_argument(flag, nargs="+", action="extend", default=[], metavar="PATH",
                       help=f"{what}: folders of images and videos (recursive; masks/ left out), or files")
    add_models_option(e, "the model set whose visibility model to score, or one model's folder")
    e.add_argument("--every", type=int, default=1, metavar="N", help="of a video, every Nth frame (default 1)")
    e.set_defaults(func=cmd_evaluate_visibility)

    p = sub.add_parser("replay", help="run the pipeline over recorded videos; write annotated video, timeline and report")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files or directories of videos")
    p.add_argument("--out", required=True, help="output directory (one folder per video)")
    p.add_argument("--labels", help="Cholec80 phase file for a single video (default: <name>-phase.txt next to it)")
    p.add_argument("--masks", help="directory of CholecSeg8k-format masks frameNNNNNN.png (default: masks/<name>/ next to it)")
    p.add_argument("--paced", action="store_true", help="replay at the video's own frame rate, as if live")
    p.add_argument("--anatomy-every", type=int, default=None,
                   help="run the anatomy model every k frame periods of media time (default: its manifest's cadence)")
    add_models_option(p)
    p.add_argument("--rules", help="decision-support rules file (TOML; default: the built-in cholecystectomy set)")
    p.add_argument("--time-scale", type=float, help="the video's time compression, for phase-duration limits "
                   "(default: from <name>.json next to a synthetic video, else 1)")
    p.add_argument("--video", choices=("annotated", "none"), default="annotated",
                   help="annotated: write annotated.mp4 (H.264, plays in a browser; default); none: no video, faster")
    p.add_argument("--video-height", default="720", metavar="N|source",
                   help="record the annotated video at most N pixels tall, scaled down from taller sources "
                        "(default 720); 'source': the source's own size")
    add_log_options(p, on_command=True)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("archive", help="replay an archive of recorded surgeries on a Ray cluster, resumably; "
                                       "compare the cases in a cohort report")
    archive_sub = p.add_subparsers(dest="archive_command", metavar="ACTION")
    archive_sub.required = True
    q = archive_sub.add_parser("run", help="replay every case (one Ray task per video), skipping those already done")
    q.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="video files, folders (per-case subfolders included) or CSV manifests path,case_id[,labels]")
    q.add_argument("--out", required=True, metavar="DIR", help="archive folder: one DIR/<case id>/ per case")
    q.add_argument("--ray", default="local", metavar="ADDRESS|local",
                   help="a Ray cluster's address (host:6379, auto, ray://host:10001), or local: start Ray on this "
                        "machine (default)")
    add_models_option(q)
    q.add_argument("--workers", type=int, help="replay workers, each holding the models once (default: one per CPU "
                                               "of the cluster, one per GPU where it has GPUs)")
    q.add_argument("--retries", type=int, default=2, help="tries again a failed video this many times (default 2)")
    q.set_defaults(func=cmd_archive_run)
    q = archive_sub.add_parser("report", help="the cohort report (cohort.html, cohort.json, cases.csv) of an archive folder")
    q.add_argument("dir", metavar="DIR", help="the folder `archive run` wrote")
    q.add_argument("--out", metavar="DIR", help="where the report goes (default: DIR)")
    q.set_defaults(func=cmd_archive_report)

    p = sub.add_parser("serve", help="run the agent: source, pipeline and gRPC server")
    p.add_argument("--config", help="configuration file (TOML; see agent/agent.example.toml)")
    p.add_argument("--listen", help="HOST:PORT to listen on (config server.listen; default 127.0.0.1:50051)")
    p.add_argument("--source", help="start a case on this source at launch: video file, camera index, /dev/videoN, rtsp:// URL")
    p.add_argument("--case-id", help="case identifier, no patient data (default: case-<date>-<time>)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--paced", dest="paced", action="store_true", default=None, help="replay files at their native rate (default)")
    pace.add_argument("--unpaced", dest="paced", action="store_false", help="process files as fast as possible")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-ca", help="CA of the displays' client certificates (mutual TLS)")
    p.add_argument("--insecure", action="store_true", help="allow plaintext beyond loopback (logged as a warning)")
    add_models_option(p)
    p.add_argument("--backend", choices=BACKENDS,
                   help="inference backend (config pipeline.backend; default auto: TensorRT where an engine exists)")
    p.add_argument("--preprocessing", choices=FRAME_PATHS,
                   help="where model inputs are made (config pipeline.preprocessing; default auto: GPU kernels with TensorRT)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP there (config server.metrics_listen; default off; loopback "
                        "unless --insecure)")
    add_log_options(p, on_command=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="the agent's configuration file: check it without starting anything")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True
    c = config_sub.add_parser("check", help="validate FILE as serve would (keys, TLS files, revocation list, "
                                            "model set, rules, audit directory); exit 0 if serve would start with it")
    c.add_argument("file", metavar="FILE", help="configuration file (TOML; see agent/agent.example.toml)")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("display", help="the reference OR display: overlays from a running agent, full screen")
    p.add_argument("--target", required=True, help="the agent's HOST:PORT")
    p.add_argument("--client-id", default=None,
                   help="this display's name, for logs and acknowledgements (default: the name in --tls-cert, else display)")
    p.add_argument("--video", help="a local copy of the video: draw overlays on it, matched by media timestamp")
    p.add_argument("--headless", metavar="OUT.mp4", help="write what would be shown to a video file instead of a window")
    p.add_argument("--stale-ms", type=float, default=250.0, help="show AI OFF when the newest overlay is older (default 250)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until q or Esc)")
    p.add_argument("--tls-ca", help="CA that signed the agent's certificate (enables TLS)")
    p.add_argument("--tls-cert", help="this display's client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="this display's client key")
    p.add_argument("--verbose", action="store_true", help="log connection changes")
    p.set_defaults(func=cmd_display)

    from or_agent.agent.certs import CA_DAYS, CERT_DAYS

    p = sub.add_parser("certs", help="make a local CA, the box's server certificate and the displays' client certificates; "
                                     "revoke a display's (certs revoke NAME --out DIR)")
    p.add_argument("--out", help="directory of the certificates (made 0700 if new); required")
    p.add_argument("--box", help="the box's name: the server certificate's CN and a DNS name in it; required")
    p.add_argument("--display", action="append", default=[], metavar="NAME",
                   help="make a client certificate for this display (repeatable)")
    p.add_argument("--dns", action="append", default=[], metavar="NAME",
                   help="another DNS name of the box for the server certificate (repeatable)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                   help="another IP address of the box for the server certificate (repeatable)")
    p.add_argument("--ca-days", type=int, default=CA_DAYS, help=f"validity of a new CA in days (default {CA_DAYS})")
    p.add_argument("--cert-days", type=int, default=CERT_DAYS,
                   help=f"validity of the server and display certificates in days (default and most {CERT_DAYS})")
    p.add_argument("--force-new-ca", action="store_true",
                   help="make a new CA even if DIR has one (every display then needs a new certificate)")
    p.set_defaults(func=cmd_certs)
    certs_sub = p.add_subparsers(dest="certs_command", metavar="[revoke]")
    r = certs_sub.add_parser("revoke", help="revoke a display's certificates: the agent refuses them from then on")
    r.add_argument("name", metavar="NAME", help="the display's name (its certificate's CN)")
    r.add_argument("--out", required=True, help="the certificates' directory (as given to or-agent certs --out)")
    r.set_defaults(func=cmd_certs_revoke)

    p = sub.add_parser("doctor", help="check this box: GPU, drivers, TensorRT, ONNX Runtime, cameras, engines, disk, clock")
    add_models_option(p)
    p.add_argument("--cache-dir", help="TensorRT engine cache (default: $OR_AGENT_ENGINE_CACHE or ~/.cache/or-agent/engines)")
    p.add_argument("--audit-dir", default="audit", help="audit trail directory, for its free disk space (default audit)")
    p.add_argument("--no-capture-probe", action="store_true", help="do not try to open the capture devices")
    p.add_argument("--config", help="agent configuration (TOML): its server.tls_cert and tls_ca (and clients/ beside "
                                    "the CA) are checked for expiry")
    p.add_argument("--certs", action="append", metavar="PATH",
                   help="a certificate file, or a directory made by `or-agent certs`, to check for expiry (repeatable)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("qualify", help="on-site acceptance test: deployed backend vs ONNX Runtime, latency budget, report")
    p.add_argument("--out", default="qualification", help="where the report goes (default qualification/)")
    p.add_argument("--clip", help="reference clip (default: the first held-out synthetic surgery, regenerated from its seed)")
    add_models_option(p)
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="the backend to qualify (default auto)")
    p.add_argument("--preprocessing", default="auto", choices=FRAME_PATHS,
                   help="the frame path to qualify (default auto: GPU kernels where a model runs on TensorRT)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="qualify TensorRT engines replayed as CUDA graphs (config pipeline.cuda_graphs)")
    p.add_argument("--budget-ms", type=float, default=50.0, help="capture->publish p99 budget in ms (default 50)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of the clip played live for the latency check (default 20)")
    p.add_argument("--frames", type=int, default=200, help="frames compared between backends (default 200)")
    add_log_options(p, on_command=True)
    p.set_defaults(func=cmd_qualify)

    p = sub.add_parser("build-engines", help="build a TensorRT engine per model for this GPU (before a case, never during)")
    add_models_option(p)
    p.add_argument("--cache-dir", help="engine cache (default: $OR_AGENT_ENGINE_CACHE or ~/.cache/or-agent/engines)")
    p.add_argument("--timing-cache", help="persisted TensorRT timing cache (default: <cache>/timing.cache)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are already in the cache")
    p.add_argument("--prune", action="store_true", help="remove engines of models that are no longer installed "
                                                        "(engines of every set in the model store are kept)")
    p.add_argument("--store", help="the model store whose sets' engines --prune keeps (default: as `or-agent models list`)")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("audit", help="the audit trail: verify its hash chain, prune old files")
    audit_sub = p.add_subparsers(dest="audit_command", metavar="ACTION")
    audit_sub.required = True
    v = audit_sub.add_parser("verify", help="check the hash chain; report the first broken record (exit 0 intact, 1 broken)")
    v.add_argument("paths", nargs="+", metavar="PATH", help="audit directory, or audit-*.jsonl files in order")
    v.set_defaults(func=cmd_audit_verify)
    v = audit_sub.add_parser("prune", help="remove whole old audit files by the retention settings, on the record "
                                           "(never the newest; the agent also prunes at start and daily)")
    v.add_argument("directory", nargs="?", metavar="DIR", help="audit directory (default: the config's audit.directory)")
    v.add_argument("--config", help="agent configuration (TOML) with [audit] retention_days and retention_mb")
    v.add_argument("--days", type=int, help="remove files whose last record is older than this (default: audit.retention_days)")
    v.add_argument("--mb", type=int, help="remove the oldest files while the trail is bigger than this (default: audit.retention_mb)")
    v.set_defaults(func=cmd_audit_prune)

    from or_agent.calibration.fp16 import DEFAULT_OUT as FP16_OUT
    from or_agent.calibration.int8 import DEFAULT_FRAMES
    from or_agent.calibration.int8 import DEFAULT_OUT as INT8_OUT

    p = sub.add_parser("calibrate", help="INT8/FP16 models for the box (precision in the ONNX file), "
                                         "their comparison with FP32, and the phase model's confidence calibration")
    calibrate_sub = p.add_subparsers(dest="calibrate_command", metavar="ACTION")
    calibrate_sub.required = True

    q = calibrate_sub.add_parser("int8", help="explicit INT8: a Q/DQ model calibrated on frames sampled from recorded videos")
    q.add_argument("--model", required=True, help="model folder or name in the models directory, or 'all'")
    q.add_argument("--videos", nargs="+", required=True, metavar="PATH",
                   help="videos or directories of videos to sample calibration frames from (labels next to them "
                        "are used to stratify: <name>-phase.txt, <name>-flags.csv)")
    q.add_argument("--out", default=str(INT8_OUT), help=f"models directory to write <name>-int8/ into (default {INT8_OUT})")
    q.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"calibration frames (default {DEFAULT_FRAMES})")
    add_models_option(q, "where the FP32 models are")
    q.set_defaults(func=cmd_calibrate_int8)

    q = calibrate_sub.add_parser("fp16", help="FP16: float16 weights and activations, float32 inputs and outputs")
    q.add_argument("--model", required=True, help="model folder or name in the models directory, or 'all'")
    q.add_argument("--out", default=str(FP16_OUT), help=f"models directory to write <name>-fp16/ into (default {FP16_OUT})")
    add_models_option(q, "where the FP32 models are")
    q.set_defaults(func=cmd_calibrate_fp16)

    q = calibrate_sub.add_parser("compare", help="FP32 vs FP16 vs INT8 on held-out video: accuracy, agreement with FP32, ms/frame")
    q.add_argument("--videos", nargs="+", metavar="PATH",
                   help="held-out videos with labels and masks next to them (default: the first held-out synthetic surgery)")
    q.add_argument("--variants", nargs="+", metavar="DIR",
                   help="model folders or models directories to compare (default: the FP32 models, "
                        "out/models-fp16 and out/models-int8)")
    add_models_option(q, "where the FP32 references are")
    q.add_argument("--no-write", action="store_true", help="print only; do not store the figures in the manifests")
    q.set_defaults(func=cmd_calibrate_compare)

    q = calibrate_sub.add_parser("temperature", help="fit the phase model's softmax temperature on labelled videos; report ECE")
    q.add_argument("--videos", nargs="+", required=True, metavar="PATH",
                   help="videos with phase labels next to them (<name>-phase.txt or .csv); not the training videos")
    q.add_argument("--model", default=None, help="phase model folder or name (default: the installed phase model)")
    add_models_option(q)
    q.add_argument("--check", nargs="+", metavar="PATH", default=None,
                   help="labelled videos kept out of the fit: ECE before/after measured there too, and the "
                        "temperature is written only if it helps there (lower ECE and NLL)")
    q.add_argument("--dry-run", action="store_true", help="report only; do not write the temperature into the manifest")
    q.set_defaults(func=cmd_calibrate_temperature)

    p = sub.add_parser("demo", help="the quick start: a synthetic surgery played live through the agent to the display")
    p.add_argument("--out", default="out/demo", help="where the synthetic surgery is written (default out/demo)")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic surgery (default 7)")
    p.add_argument("--time-scale", type=float, default=40.0, help="time scale of the synthetic surgery (default 40: about 1 minute)")
    add_models_option(p)
    p.add_argument("--headless", metavar="OUT.mp4", help="record the display to a file instead of a window (automatic without a screen)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bundle", help="build an offline install bundle for an OR box: wheelhouse, install.sh, SBOM, "
                                      "SHA256SUMS (run from the repository, online)")
    p.add_argument("--out", required=True, metavar="DIR", help="the bundle's folder (must not exist yet)")
    p.add_argument("--python-version", metavar="3.X", help="the box's CPython version (default: this interpreter's)")
    p.add_argument("--platform", metavar="TAG", help="the box's wheel platform tag, e.g. manylinux_2_28_x86_64 "
                                                    "(default: this machine's)")
    p.add_argument("--extras", default="", metavar="NAMES", help="comma-separated extras locked apart to add: gpu "
                                                                "(TensorRT for CUDA 12, pycuda)")
    p.set_defaults(func=cmd_bundle)
    return ap


def _quiet_native_video_logs(args) -> None:
    """OpenCV and FFmpeg print their own lines about a file they cannot open ("[ WARN:0@1.2] global cap.cpp:212
    open VIDEOIO(FFMPEG): ...", "moov atom not found") beside ours, which names the file and the problem in one
    line. Quiet unless ``--log-level debug``; an OPENCV_LOG_LEVEL or OPENCV_FFMPEG_LOGLEVEL already set wins.
    The variables reach the processes started from here (Ray's workers), which read them at their first
    import of OpenCV and first capture; this process has imported OpenCV already, so its level is also set."""
    if getattr(args, "log_level", None) == "debug" or "OPENCV_LOG_LEVEL" in os.environ:
        return
    os.environ["OPENCV_LOG_LEVEL"] = "ERROR"
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_native_video_logs(args)
    try:
        if args.log_level or args.log_format:  # serve and display set theirs up themselves, with their defaults
            _setup_logging(args)
        return args.func(args)
    except OrAgentError as exc:
        print(f"or-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("or-agent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`or-agent models | head -1`): end quietly, as command-line tools do;
        # stdout points at /dev/null so that the interpreter's last flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug of ours, not the user's: still one line, with a way to see more
        if os.environ.get("OR_AGENT_DEBUG"):
            raise
        print(f"or-agent: internal error: {type(exc).__name__}: {exc} (run with OR_AGENT_DEBUG=1 for the traceback, "
              "and please report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
