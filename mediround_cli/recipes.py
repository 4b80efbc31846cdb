"""``mediround recipes``: list the shipped recipes (the repository's ``recipes/``); ``recipes show NAME`` prints one."""

from __future__ import annotations

import click

from mediround.training.recipe import shipped_recipe, shipped_recipes
from mediround_cli.common import console, handle_errors


@click.group(invoke_without_command=True, epilog="""\b
Examples:
  mediround recipes
  mediround recipes show mediround-7b-4gpu > my-recipe.yaml   # edit, then: mediround train my-recipe.yaml""")
@click.pass_context
@handle_errors
def recipes(ctx: click.Context) -> None:
    """List the shipped recipes; any command taking a RECIPE also takes one of these names."""
    if ctx.invoked_subcommand is None:
        for name, path in shipped_recipes().items():
            console.print(f"{name}\t{_first_comment(path.read_text(encoding='utf-8'))}", markup=False,
                          soft_wrap=True)


def _first_comment(text: str) -> str:
    """The first comment line of a recipe: what it is for (empty for a file without comments)."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@recipes.command("show", epilog="""\b
Examples:
  mediround recipes show tiny-cpu
  mediround recipes show mediround-7b-24gb > my-recipe.yaml""")
@click.argument("name")
@handle_errors
def show(name: str) -> None:
    """Print the shipped recipe NAME, to copy and edit."""
    click.echo(shipped_recipe(name).read_text(encoding="utf-8"), nl=False)
