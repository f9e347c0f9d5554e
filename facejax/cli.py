"""Shared entry-point wrapper for scripts: user errors become one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from facejax.errors import FacejaxError


def overrides_epilog(example: str) -> str:
    """The --help text about `--config.a.b=value` overrides, ending with `example`
    (use with argparse.RawDescriptionHelpFormatter)."""
    return ("config overrides:\n"
            "  --config.SECTION.KEY=VALUE  sets any field of the config (the fields and their\n"
            "                              meaning: configs/common.py); repeat it for several. An\n"
            "                              unknown key or a value of the wrong type is an error.\n"
            "  --config.model.pretrained=  (empty) starts from random weights instead\n"
            f"  example: {example}")


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # grain worker processes read absl flags; mark them parsed once (else absl raises
        # UnparsedFlagAccessError in the workers).
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        code = main(argv)
    except FacejaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
            PermissionError) as e:
        # A path the user gave (or its parent) is missing, of the wrong kind, or not writable.
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
