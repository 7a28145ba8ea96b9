"""`python -m imagebroker.testing serve PROVIDER [--port N] [--scenario FILE]`: run a fake provider
server on 127.0.0.1 so that you (and your CI) can exercise a policy offline.

A scenario file is YAML: `script: [429, ok, refuse, ...]` (see imagebroker.testing.fakes)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from .fake_http import FakeImageServer
from .fakes import fakes


def main(argv: list[str] | None = None) -> int:
    available = sorted([*fakes(), "fakehttp"])
    ap = argparse.ArgumentParser(prog="python -m imagebroker.testing")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a fake provider on 127.0.0.1")
    serve.add_argument("provider", choices=available)
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--scenario", type=Path, default=None)
    args = ap.parse_args(argv)
    script = ["ok"]
    if args.scenario:
        try:
            script = [str(s) for s in yaml.safe_load(args.scenario.read_text())["script"]]
        except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
            print(f"error: {args.scenario}: needs `script: [step, ...]` ({exc})", file=sys.stderr)
            return 2
    if args.provider == "fakehttp":
        server, key, env, base = FakeImageServer(script, args.port), "any", "FAKEHTTP_API_KEY", None
    else:
        from ..providers.registry import provider_class

        server = fakes()[args.provider](script, args.port)
        key, env = server.key, provider_class(args.provider).api_key_env
    with server:
        base = getattr(server, "base_url", server.url)
        print(f"fake {args.provider} listening on {server.url}", flush=True)
        if env:
            print(f"  export {env}={key}", flush=True)
        print(f"  policy: providers: {{{args.provider}: {{base_url: {base}}}}}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
