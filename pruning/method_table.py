"""Print the registered methods and their parameters as the Markdown tables of docs/method.md.

    python -m pruning.method_table

docs/method.md holds exactly this output (a test checks it), so after registering a method, paste the new output
between the ``method-table`` markers there.
"""

from __future__ import annotations

import sys

import pruning  # noqa: F401  (registers the built-in methods)
from pruning import registry


def main(argv: list[str] | None = None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    sys.stdout.write(registry.markdown_tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
