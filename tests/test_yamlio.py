"""medq.yamlio: yaml.safe_load's document plus every repeated key with its section and lines."""
import pytest
import yaml

from medq.errors import ConfigError
from medq.yamlio import parse_yaml, refuse_repeated

TEXT = """\
a: 1
b:
  c: 2
  d: [1, 2]
  c: 3
a: 4
e:
  - {x: 1, x: 2}
"""


def test_the_document_is_what_safe_load_reads_and_every_repeat_is_recorded():
    data, repeated = parse_yaml(TEXT, "t.yaml")
    assert data == yaml.safe_load(TEXT)
    found = {(r.dotted, r.lines) for r in repeated}
    assert found == {("a", (1, 6)), ("b.c", (3, 5)), ("e[0].x", (8, 8))}
    # the error names the repeat met first reading down the file (line 5), and counts the others
    with pytest.raises(ConfigError, match=r"^t.yaml: key 'b.c' appears 2 times \(lines 3 and 5\);.*2 more"):
        refuse_repeated("t.yaml", repeated)


def test_merge_keys_and_aliases_are_not_repeats():
    text = "base: &b {k: 1, m: 2}\nuse:\n  <<: *b\n  k: 3\nagain: *b\n"
    data, repeated = parse_yaml(text, "m.yaml")
    assert data == yaml.safe_load(text) and data["use"] == {"k": 3, "m": 2}
    assert repeated == []


def test_quoting_does_not_hide_a_repeat_and_different_keys_are_not_one():
    _, repeated = parse_yaml("'train': 1\ntrain: 2\n'1': a\n1: b\n", "q.yaml")
    assert [(r.key, r.lines) for r in repeated] == [("train", (1, 2))]  # the string '1' and the integer 1 differ
