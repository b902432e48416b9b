"""The command line (contract §1). Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import ConfigError, GatewayConfig, default_config_path, load_config
from gateway.mqtt.acl import AclError
from gateway.mqtt.broker import BrokerStartError
from gateway.store.schema import StoreError, connect, db_path


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parking-gateway", description="Edge gateway for car parks.")
    p.add_argument("--version", action="version", version=f"parking-gateway {__version__}")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `--debug` also after the command; SUPPRESS keeps a top-level `--debug` from being reset by the default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="debug logging and tracebacks")

    run = sub.add_parser("run", parents=[common], help="run the daemon")
    run.add_argument(
        "--config",
        type=Path,
        help="config file (default: $PARKING_GATEWAY_CONFIG, /etc/parking-gateway/gateway.toml, else the bundled demo)",
    )

    check = sub.add_parser("check-config", parents=[common], help="validate a config file")
    check.add_argument("path", type=Path)

    status = sub.add_parser("status", parents=[common], help="availability, sensors and outbox from the store")
    status.add_argument("--config", type=Path)
    status.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", parents=[common], help="check the store's invariants (read-only)")
    audit.add_argument("--config", type=Path)

    demo = sub.add_parser(
        "demo", parents=[common], help="the demo site: embedded broker, gateway and simulated devices, live"
    )
    demo.add_argument("--duration", type=_positive, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    demo.add_argument("--port", type=int, metavar="N", help="broker port (default 1883 if free, else a free port)")
    demo.add_argument("--seed", type=int, default=1, metavar="N", help="simulation seed (default 1)")
    demo.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="keep the store here (default: a fresh temporary directory)"
    )

    from simulators.cli import add_arguments

    passwd = sub.add_parser(
        "passwd",
        parents=[common],
        help="add or change an account in the embedded broker's users_file (like mosquitto_passwd)",
    )
    passwd.add_argument("file", type=Path, help="the users_file; created (mode 0600) if missing")
    passwd.add_argument("user")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    passwd.add_argument("--delete", action="store_true", help="remove the account instead")

    simulate = sub.add_parser("simulate", parents=[common], help="simulated sensors and cameras against a broker")
    add_arguments(simulate)
    return p


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _config(path: Path | None) -> GatewayConfig:
    return load_config(path if path is not None else default_config_path())


def _read_conn(cfg: GatewayConfig) -> sqlite3.Connection:
    return connect(db_path(cfg.state_path()), synchronous=cfg.store.synchronous, readonly=True)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.mqtt.local import broker_warnings

    cfg = load_config(args.path)
    for warning in broker_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    specs = cfg.slot_specs()
    print(f"{args.path}: ok ({len(cfg.lots)} lots, {len(specs)} slots, {len(cfg.gates)} gates)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from gateway.store.status import render_text, status_document

    conn = _read_conn(_config(args.config))
    try:
        doc = status_document(conn)
    finally:
        conn.close()
    print(json.dumps(doc, indent=2) if args.json else render_text(doc))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from gateway.store.audit import audit

    conn = _read_conn(_config(args.config))
    try:
        problems = audit(conn)
    finally:
        conn.close()
    for line in problems:
        print(line)
    if problems:
        return 1
    print("audit: all invariants hold")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import run_daemon

    cfg = _config(args.config)
    return asyncio.run(run_daemon(cfg))


def _cmd_demo(args: argparse.Namespace) -> int:
    import logging

    import structlog

    from gateway.demo.run import DemoOptions, run_demo

    if not 1 <= (args.port or 1) <= 65535:
        raise UsageError(f"--port must be 1..65535, not {args.port}")
    if not args.debug:
        # The view owns the terminal; the gateway's routine log lines would scroll it away.
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    options = DemoOptions(duration=args.duration, port=args.port, seed=args.seed, state_dir=args.state_dir)
    return asyncio.run(run_demo(options))


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulators.cli import run_from_args

    return asyncio.run(run_from_args(args))


def _cmd_passwd(args: argparse.Namespace) -> int:
    from gateway.mqtt.users import UsersFileError, set_password

    password = None
    if not args.delete:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            import getpass

            password = getpass.getpass(f"password for {args.user}: ")
            if getpass.getpass("again: ") != password:
                raise UsageError("the passwords differ")
    try:
        set_password(args.file, args.user, password)
    except UsersFileError as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.file}: {'removed' if args.delete else 'set'} {args.user}")
    return 0


COMMANDS = {
    "passwd": _cmd_passwd,
    "run": _cmd_run,
    "demo": _cmd_demo,
    "simulate": _cmd_simulate,
    "check-config": _cmd_check_config,
    "status": _cmd_status,
    "audit": _cmd_audit,
}


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from gateway.logs import configure

    configure(debug=args.debug)
    try:
        try:
            return COMMANDS[args.command](args)
        except BaseExceptionGroup as group:
            # A task failing inside the daemon's TaskGroup: report the cause, not the group.
            raise _first_leaf(group) from group
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    except (UsageError, StoreError, BrokerStartError, AclError) as exc:
        # Known failures carry a message written for the operator: print it as it is.
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | AclError) else 1
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
