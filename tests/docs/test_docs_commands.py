"""Every `cdmbench ...` command that README.md, CONTRIBUTING.md and docs/*.md show parses: its
subcommand exists in ``cdmbench.cli.cli``, its ``--help`` works, and every ``--flag`` it uses is
an option of that subcommand. Commands come from shell code blocks and from inline code spans
(table cells included); synopses such as ``cdmbench run RECIPE [--stage NAME]`` are checked too.
Nothing is run."""

import functools
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cdmbench.cli import cli

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.S | re.M)
# `cdmbench SUB`, also inside `python -m cdmbench SUB` and `torchrun ... -m cdmbench SUB`
COMMAND = re.compile(r"(?<![\w./\"'-])cdmbench[ \t]+(?=[\w-])")
END = {"&&", "||", ";", "|", ">", ">>", "2>&1"}  # shell operators after which a command is over
FLAG = re.compile(r"--?[A-Za-z][\w-]*")


def commands(text: str) -> list[str]:
    """The `cdmbench ...` commands in a Markdown text, each from `cdmbench` to the end of its line
    or code span (a span may wrap over lines)."""
    lines = []
    for language, body in FENCE.findall(text):
        if language in SHELL_BLOCKS:
            lines += body.replace("\\\n", " ").splitlines()
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)) if "\n\n" not in span]
    return [line[match.start():] for line in lines for match in COMMAND.finditer(line)]


@functools.cache
def help_works(name: str) -> bool:
    return CliRunner().invoke(cli, [name, "--help"]).exit_code == 0


def problems(command: str) -> list[str]:
    """What is wrong with one `cdmbench SUB ...` line (nothing: it parses)."""
    try:
        words = shlex.split(command, comments=True)[1:]
    except ValueError as exc:
        return [f"shlex cannot split it: {exc}"]
    if words[0].startswith("-"):  # cdmbench --version
        return [] if words[0] in ("--help", "--version") else [f"cdmbench has no option {words[0]}"]
    name = words[0]
    command = cli.commands.get(name)
    if command is None:
        return [f"no subcommand {name!r} (known: {', '.join(sorted(cli.commands))})"]
    if not help_works(name):
        return [f"cdmbench {name} --help fails"]
    options = {"--help"} | {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
    used = []
    for word in words[1:]:
        if word in END or word.startswith(">"):
            break
        if word.lstrip("[(").startswith("-"):  # a flag, or alternatives: [--compile/--no-compile]
            used += FLAG.findall(word)
        if word.endswith(";"):
            break
    return [f"cdmbench {name} has no option {flag}" for flag in used if flag not in options]


DOCUMENTED = [(page.relative_to(ROOT).as_posix(), c) for page in PAGES if page.exists()
              for c in commands(page.read_text())]


@pytest.mark.parametrize("page, command", DOCUMENTED, ids=[f"{p}: {c[:70]}" for p, c in DOCUMENTED])
def test_every_documented_command_parses(page, command):
    assert not problems(command), f"{page}: {command}"


def test_the_pages_show_commands():
    pages = {page for page, _ in DOCUMENTED}
    assert {"README.md", "CONTRIBUTING.md", "docs/training.md", "docs/evaluation.md"} <= pages
    assert {c.split()[1] for _, c in DOCUMENTED} >= set(cli.commands)  # every command is documented


def test_the_checker_finds_commands_and_fails_on_bad_ones():
    text = ("Run `cdmbench run RECIPE [--stage NAME] [--set KEY=VALUE ...]` or\n\n```bash\n"
            "torchrun --nproc_per_node 2 -m cdmbench bench R --stage S \\\n  --no-compile  # a comment\n```\n\n"
            "```python\nfrom cdmbench import hookimpl\n```\n"
            "`cdmbench.testing`, `plugins/cdmbench-diffusers`, a span that wraps: `cdmbench\nls`\n")
    assert commands(text) == ["cdmbench bench R --stage S    --no-compile  # a comment",
                              "cdmbench run RECIPE [--stage NAME] [--set KEY=VALUE ...]", "cdmbench ls"]
    assert all(not problems(c) for c in commands(text))
    assert not problems("cdmbench ls [KIND] [--pattern GLOB]")
    assert not problems("cdmbench bench RECIPE --stage S [--compile/--no-compile] && cdmbench nonsense --x")
    assert not problems(*commands("```bash\nfor s in a b; do cdmbench evaluate RUN --stage $s; done --bogus\n```"))
    planted = "cdmbench run RECIPE [--stage NAME] [--no-such-flag]"
    assert problems(planted) == ["cdmbench run has no option --no-such-flag"]
    assert problems("cdmbench sweep RUN --stage S --levels 0,0.1 --out x") == ["cdmbench sweep has no option --out"]
    assert "no subcommand 'frobnicate'" in problems("cdmbench frobnicate RUN_DIR")[0]
