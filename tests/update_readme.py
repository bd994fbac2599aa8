"""Regenerate the README's model table from the registry: ``python tests/update_readme.py``."""

import pathlib
import re

from vafunc.cli.app import model_table

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    text = README.read_text()
    new = re.sub(
        r"(<!-- models:start -->\n).*?(<!-- models:end -->)",
        lambda m: m.group(1) + model_table() + "\n" + m.group(2),
        text,
        flags=re.S,
    )
    README.write_text(new)


if __name__ == "__main__":
    main()
