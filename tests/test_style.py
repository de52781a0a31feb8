"""Code style the linter does not check: no function in ``rnnjax/`` runs past
:data:`MAX_LINES` lines of code (an AST count: the lines a function spans, less its docstring, blank lines and
comment-only lines; nested functions count towards the function that holds them)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def _code_lines(source: str) -> set[int]:
    """The line numbers of ``source`` that hold code (not only a comment, not blank)."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, lines of code)`` of every function in the file at ``path``."""
    source = path.read_text(encoding="utf-8")
    code = _code_lines(source)
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = set(range(child.lineno, child.end_lineno + 1))
                if ast.get_docstring(child) is not None:
                    doc = child.body[0]
                    span -= set(range(doc.lineno, doc.end_lineno + 1))
                found.append((name, child.lineno, len(span & code)))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_no_function_in_rnnjax_runs_past_max_lines():
    long = [f"{path.relative_to(ROOT)}:{line} {name}: {n} lines"
            for path in sorted((ROOT / "rnnjax").rglob("*.py"))
            for name, line, n in function_lengths(path) if n > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines of code:\n" + "\n".join(long)
