"""mkdocs hook: the generated parts of the documentation, rendered from the code at build time.

A page asks for a generated block with an HTML comment on a line of its own:

    <!-- generated:cli -->          the commands of pyproject's [project.scripts], from their click objects
    <!-- generated:error-codes -->  every error code the package raises, found in its source (AST scan)

and the bad-input table between `<!-- bad-inputs:start -->` and `<!-- bad-inputs:end -->` is replaced by
tests/badinputs.py's `markdown_table()` (tests/test_bad_inputs.py keeps the committed copy equal to it).

Nothing here imports the runtime: the CLI reference imports the module that defines the click commands
(cli.py imports click and errors.py only), the error codes are read from the source without importing it.
The functions are plain and importable (tests/test_docs.py calls them without mkdocs).
"""

from __future__ import annotations

import ast
import atexit
import importlib
import inspect
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent  # the repository root, which is the package medblip_edge
PACKAGE = "medblip_edge"
SKIP_DIRS = {"tests", "docs", "build", "dist", "site", ".venv", "venv", "bundles", "demo-bundle", "results",
             "__pycache__", ".git", ".ci"}

CLI_MARK = "<!-- generated:cli -->"
CODES_MARK = "<!-- generated:error-codes -->"
BAD_START, BAD_END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


# ------------------------------------------------------------------ importing this checkout's package


def import_from_checkout(module: str):
    """Import `medblip_edge.<module>` from this checkout (ROOT), not from another installed copy."""
    spec = importlib.util.find_spec(PACKAGE) if PACKAGE not in sys.modules else sys.modules[PACKAGE].__spec__
    origin = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    if origin != ROOT:
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        link_dir = Path(tempfile.mkdtemp(prefix="medblip-docs-"))
        atexit.register(shutil.rmtree, link_dir, True)
        (link_dir / PACKAGE).symlink_to(ROOT, target_is_directory=True)
        sys.path.insert(0, str(link_dir))
        importlib.invalidate_caches()
    return importlib.import_module(f"{PACKAGE}.{module}")


# ------------------------------------------------------------------ CLI reference (click)


def scripts() -> dict[str, str]:
    """pyproject's console scripts: name -> 'medblip_edge.module:function'."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*").replace("_", "\\_")


def _help_markdown(help_text: str) -> str:
    """click help text -> markdown: `\\b` paragraphs verbatim (code blocks), the others joined lines."""
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(help_text or "")):
        if para.startswith("\b"):
            out.append("```\n" + para.lstrip("\b").strip("\n") + "\n```")
        elif para.strip():
            out.append(" ".join(para.split()))
    return "\n\n".join(out)


def _type_of(param) -> str:
    import click

    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    if isinstance(param.type, click.Choice):
        return " \\| ".join(f"`{c}`" for c in param.type.choices)
    return param.type.name.upper()


def _default_of(param) -> str:
    import click

    if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
        return f"`{(param.opts if param.default else param.secondary_opts)[0]}`"
    unset = getattr(importlib.import_module("click.core"), "UNSET", None)  # click >= 8.3: "no default given"
    if param.default in (None, False, ()) or (unset is not None and param.default is unset) or param.required:
        return ""
    if isinstance(param, click.Option) and param.is_flag:
        return ""
    return f"`{param.default}`"


def command_markdown(name: str, cmd) -> str:
    """One command: its help, usage and a table of its arguments and options."""
    import click

    ctx = click.Context(cmd, info_name=name)
    usage = cmd.collect_usage_pieces(ctx)
    lines = [f"## {name}", "", _help_markdown(cmd.help), "", "```", f"{name} {' '.join(usage)}", "```", "",
             "| argument or option | value | default | required | what it does |", "| --- | --- | --- | --- | --- |"]
    for p in cmd.params:
        if isinstance(p, click.Argument):
            names = f"`{p.human_readable_name}`" + (" ..." if p.nargs == -1 else "")
            helptext = "positional argument" + ((", one or more" if p.required else ", any number")
                                                if p.nargs == -1 else "")
        else:
            names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            helptext = p.help or ""
        lines.append(f"| {names} | {_type_of(p)} | {_default_of(p)} | {'yes' if p.required else ''} | "
                     f"{_cell(helptext)} |")
    if cmd.get_help_option(ctx) is not None:
        lines.append(f"| {', '.join(f'`{o}`' for o in ctx.help_option_names)} | flag |  |  | Show the help and exit. |")
    return "\n".join(lines) + "\n"


def commands() -> dict:
    """Every console script in pyproject and, for a group (medblip-bench), each of its subcommands as
    "script SUB": name -> click command."""
    import click

    out = {}
    for name, target in scripts().items():
        module, _, attr = target.partition(":")
        cmd = getattr(import_from_checkout(module.removeprefix(PACKAGE + ".")), attr)
        out[name] = cmd
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=name)
            out.update({f"{name} {sub}": cmd.get_command(ctx, sub) for sub in cmd.list_commands(ctx)})
    return out


def cli_reference() -> str:
    """Every console script in pyproject (a group's subcommands included), rendered from its click command."""
    return "\n".join(command_markdown(name, cmd) for name, cmd in commands().items())


# ------------------------------------------------------------------ error codes (source scan)


def package_sources() -> list[Path]:
    """The package's .py files (tests, docs and build outputs left out), in path order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = Path(dirpath).relative_to(ROOT)
        dirnames[:] = sorted(d for d in dirnames if not (d in SKIP_DIRS or d.startswith(".")))
        if rel.parts and rel.parts[0] in SKIP_DIRS:
            continue
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def _text_of(node) -> str | None:
    """A message argument as a template: f-string fields become '…'; None if it is not a string expression."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text_of(node.left), _text_of(node.right)
        if left is not None or right is not None:
            return (left or "…") + (right or "…")
    if isinstance(node, ast.IfExp):
        return _text_of(node.body)
    return None


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _const(node) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def error_codes() -> dict[str, dict]:
    """code -> {"where": sorted module paths, "raised_as": sorted kinds, "example": one message template}.

    Found in the source: `code="..."` keyword arguments (MedblipError and its subclasses), class
    attributes `code = "..."` (the classes' defaults), `RequestError(status, "code", message)` (HTTP
    refusals), `error_row(name, sha, "code", message)` (rows made without an exception) and
    `{"code": "...", "message": ...}` literals.
    """
    codes: dict[str, dict] = {}

    def add(code, where, kind, message):
        if not isinstance(code, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", code):
            return
        e = codes.setdefault(code, {"where": set(), "raised_as": set(), "example": None})
        e["where"].add(where)
        e["raised_as"].add(kind)
        if message and (e["example"] is None or len(message) > len(e["example"])):
            e["example"] = message

    for path in package_sources():
        where = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                doc = ast.get_docstring(node)
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                            and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id == "code"):
                        add(_const(stmt.value), where, f"{node.name} (default)", doc.splitlines()[0] if doc else None)
            elif isinstance(node, ast.Call):
                name = _callee(node)
                for kw in node.keywords:
                    if kw.arg == "code":
                        add(_const(kw.value), where, name or "error",
                            _text_of(node.args[0]) if node.args else None)
                if name == "RequestError" and len(node.args) >= 2:
                    status = node.args[0]
                    http = (status.value if isinstance(status, ast.Constant) else
                            status.id if isinstance(status, ast.Name) else "?")
                    add(_const(node.args[1]), where, f"HTTP {http}",
                        _text_of(node.args[2]) if len(node.args) > 2 else None)
                if name == "error_row" and len(node.args) >= 3:
                    add(_const(node.args[2]), where, "error row",
                        _text_of(node.args[3]) if len(node.args) > 3 else None)
            elif isinstance(node, ast.Dict):
                keys = [_const(k) for k in node.keys]
                if "code" in keys:
                    message = node.values[keys.index("message")] if "message" in keys else None
                    add(_const(node.values[keys.index("code")]), where, "error row",
                        _text_of(message) if message is not None else None)
    for e in codes.values():
        e["where"], e["raised_as"] = sorted(e["where"]), sorted(e["raised_as"])
    return dict(sorted(codes.items()))


def _status_constants() -> dict[str, str]:
    """Module-level `STATUS_* = <int>` constants, so that `HTTP STATUS_TIMEOUT` reads `HTTP 504`."""
    out = {}
    for path in package_sources():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id.startswith("STATUS_") and isinstance(_const(node.value), int)):
                out[node.targets[0].id] = str(node.value.value)
    return out


def error_codes_table() -> str:
    """The error-code table: code, how it is raised, where, and one of its messages (fields shown as …)."""
    status = _status_constants()
    lines = ["| code | raised as | in | message (one of them; … is a value filled in) |", "| --- | --- | --- | --- |"]
    for code, e in error_codes().items():
        kinds = []
        for k in e["raised_as"]:
            if k.startswith("HTTP ") and k[5:] in status:
                k = f"HTTP {status[k[5:]]}"
            kinds.append(k)
        where = "<br>".join(f"`{w}`" for w in e["where"])
        lines.append(f"| `{code}` | {_cell(', '.join(dict.fromkeys(kinds)))} | {where} | {_cell(e['example'] or '')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ bad-input table (tests/badinputs.py)


def bad_inputs_table() -> str:
    """tests/badinputs.py's markdown_table() (imports numpy and nibabel, not the runtime)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import badinputs

    return badinputs.markdown_table()


def replace_between(markdown: str, start: str, end: str, body: str) -> str:
    head, rest = markdown.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


# ------------------------------------------------------------------ mkdocs events


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    if CODES_MARK in markdown:
        markdown = markdown.replace(CODES_MARK, error_codes_table())
    if BAD_START in markdown and BAD_END in markdown:
        markdown = replace_between(markdown, BAD_START, BAD_END, bad_inputs_table())
    return markdown
