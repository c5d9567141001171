"""Rewrites the config reference table in README.md from kvtierd.config (the one schema).

    .venv/bin/python scripts/config_reference.py
"""

from pathlib import Path

from kvtierd.config import describe

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def table() -> str:
    rows = ["| key | default | reload | meaning |", "|---|---|---|---|"]
    for key, default, doc, live in describe():
        rows.append(f"| `{key}` | `{default}` | {'live' if live else 'restart'} | {doc} |")
    return "\n".join(rows)


def main() -> None:
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
