"""A griffe extension for the API reference (mkdocs.yml): Sphinx roles in docstrings become inline code.

rnnjax's docstrings name other objects as ``:func:`unroll``` or ``:class:`~rnnjax.cells.Cell```; Markdown has
no such roles, so they would show as written. A role with ``~`` keeps only the last component, as Sphinx does.
"""

import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([^`]+)`")


def as_code(match: re.Match) -> str:
    short, name = match.groups()
    return f"`{name.rsplit('.', 1)[-1] if short else name}`"


class SphinxRoles(griffe.Extension):
    """Rewrites each docstring once the object tree is complete (the top package's own too)."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(as_code, obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self.on_object(obj=pkg)
