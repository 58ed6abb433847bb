"""The ``kdforge search`` command (wiring only): KD-guided DARTS, :mod:`kdforge.engine.search`.

``cli.py`` calls ``add_commands`` when it builds its parser; nothing heavy is imported until the
command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    search = sub.add_parser(
        "search", help="KD-guided DARTS: search a cell on a recipe's data, write genotype.json for darts_net"
    )
    search.add_argument("config", help="search recipe (YAML): name, data, teacher, search, derived")
    search.add_argument(
        "--set",
        nargs="+",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe values, e.g. --set search.epochs=2 search.objective=ce",
    )
    search.add_argument("--out", help="run directory (default runs/search/<name>)")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    search.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from kdforge.engine.search import load_search_recipe, run_search

    overrides = [item for group in args.set for item in group]
    recipe = load_search_recipe(args.config, overrides)
    run_search(recipe, args.out, resume=args.resume)
    return 0
