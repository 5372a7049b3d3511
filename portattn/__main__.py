"""Command line: `portattn report [--arch sm_XX] [--json] [--selftest]`, `portattn bench`."""
from __future__ import annotations

import sys

USAGE = """usage: portattn {report,bench} [options]
  report   the GPU, its limits, and the plan (path, tiles, reason) per dtype x head dim;
           --arch sm_75 plans for a table arch with no GPU; --json; --selftest
  bench    TFLOP/s of portattn's paths next to torch SDPA's backends and this GPU's peaks;
           --mode fwd (default) | fwd_bwd (forward + backward) | bwd_memory (backward's
           extra memory at 32k/64k) | decode (KV-cache decoding vs copy bandwidth)"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "report":
        from .report import main as run
    elif cmd == "bench":
        from .bench import main as run
    else:
        print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return run(rest)
    except ValueError as e:
        print(f"portattn {cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
