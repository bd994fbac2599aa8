"""Regenerate the model table of docs/models.md from the registry: ``python tests/update_readme.py``."""

import pathlib
import re

from vafunc.cli.app import model_table

MODELS_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"


def main() -> None:
    text = MODELS_PAGE.read_text()
    new = re.sub(
        r"(<!-- models:start -->\n).*?(<!-- models:end -->)",
        lambda m: m.group(1) + model_table() + "\n" + m.group(2),
        text,
        flags=re.S,
    )
    MODELS_PAGE.write_text(new)


if __name__ == "__main__":
    main()
