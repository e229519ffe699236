"""The one YAML reader for medq's own files (the run config, INC's deploy.yaml): ``yaml.safe_load`` plus a record of
repeated mapping keys with their line numbers.

``yaml.safe_load`` keeps the last of a repeated key without a word: a config with two ``train:`` blocks silently
loses the first block's settings. :func:`read_yaml` returns the document as ``yaml.safe_load`` reads it and every
repeated key (its section, the lines it appears on); the caller decides whether that is an error (the run config)
or a warning (deploy.yaml, whose last value is what INC reads too).

Numbers YAML 1.1 reads in a base no reader expects are refused with their line: ``0755`` is octal there (493) and
``1:30`` base 60 (90); YAML 1.2, and every other tool, read them otherwise.

The loader also pins ``null`` to ``None``: importing ``neural_compressor.conf.config`` rewires the global
``yaml.SafeLoader`` to read ``null`` as ``{}``; this subclass took its own copy of the constructors before that.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from medq.errors import ConfigError

_MERGE = "tag:yaml.org,2002:merge"
_YAML11_BASES = ((re.compile(r"^[-+]?0[0-7_]+$"), "octal"), (re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$"),
                                                              "base 60"))  # `<<: *base` merges another mapping in; its keys may be overridden


@dataclass(frozen=True)
class RepeatedKey:
    key: str
    section: str  # the dotted path of the mapping that holds the key; "" at the top level
    lines: tuple[int, ...]  # 1-based, in file order; yaml.safe_load keeps the last

    @property
    def top_level(self) -> bool:
        return not self.section

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, plus the repeated keys of every mapping (found on the composed node tree, before
    construction flattens merges and drops the earlier values)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.repeated: list[RepeatedKey] = []

    def construct_document(self, node):
        self._find_repeated(node, "", set())
        return super().construct_document(node)

    def _find_repeated(self, node: yaml.Node, section: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias to a node already walked (or a recursive anchor)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                self._find_repeated(child, f"{section}[{i}]", seen)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        keys = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE]
        lines: dict[tuple[str, str], list[int]] = {}
        for key_node, _ in keys:
            lines.setdefault((key_node.tag, key_node.value), []).append(key_node.start_mark.line + 1)
        self.repeated += [RepeatedKey(value, section, tuple(where)) for (_, value), where in lines.items()
                          if len(where) > 1]
        for key_node, value_node in keys:
            self._find_repeated(value_node, f"{section}.{key_node.value}" if section else key_node.value, seen)


def other_base(text: str, value: Any) -> str | None:
    """Why the plain scalar ``text``, which YAML 1.1 read as the number ``value``, is refused, or None."""
    for pattern, base in _YAML11_BASES:
        if isinstance(value, (int, float)) and pattern.match(text.strip()):
            return (f"{text.strip()} is a number in {base} for YAML 1.1 (= {value}); write the number in decimal, "
                    "or quote it if it is a name")
    return None


def _plain_number(loader: SafeConstructor, node: yaml.ScalarNode, construct) -> Any:
    """An int or float as ``yaml.safe_load`` reads it, unless YAML 1.1 reads its digits in another base."""
    value = construct(loader, node)
    problem = other_base(node.value, value)
    if problem:
        raise ConstructorError(None, None, problem, node.start_mark)
    return value


_Loader.add_constructor("tag:yaml.org,2002:null", SafeConstructor.construct_yaml_null)
_Loader.add_constructor("tag:yaml.org,2002:int",
                        lambda loader, node: _plain_number(loader, node, SafeConstructor.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float",
                        lambda loader, node: _plain_number(loader, node, SafeConstructor.construct_yaml_float))


def parse_yaml(text: str, source: str | Path, error: type[ConfigError] = ConfigError) -> tuple[Any, list[RepeatedKey]]:
    """(the document as ``yaml.safe_load`` reads it, its repeated keys); invalid YAML raises ``error`` naming
    ``source`` and the line."""
    loader = _Loader(text)
    try:
        return loader.get_single_data(), loader.repeated
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise error(f"{source}: not valid YAML{at} ({problem}); fix the syntax") from None
    finally:
        loader.dispose()


def read_yaml(path: Path, error: type[ConfigError] = ConfigError) -> tuple[Any, list[RepeatedKey]]:
    """:func:`parse_yaml` of a file (UTF-8); an unreadable file raises ``error`` naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_yaml(text, path, error)


def refuse_repeated(path: str | Path, repeated: list[RepeatedKey], error: type[ConfigError] = ConfigError) -> None:
    """One ``error`` naming the file, the first repeated key and its lines, when there is any."""
    if not repeated:
        return
    first = min(repeated, key=lambda r: r.lines[1])
    lines = " and ".join(str(n) for n in first.lines) if len(first.lines) == 2 else \
        ", ".join(str(n) for n in first.lines)
    where = "section" if first.top_level else "key"
    more = f" ({len(repeated) - 1} more repeated key(s) after it)" if len(repeated) > 1 else ""
    raise error(f"{path}: {where} {first.dotted!r} appears {len(first.lines)} times (lines {lines}); YAML would keep "
                f"only the last and silently drop the others{more}; merge them into one")
