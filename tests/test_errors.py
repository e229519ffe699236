"""errors.first_line: any exception as one short line for a MedqError message."""
from medq.errors import first_line


def test_first_line_keeps_the_first_non_blank_line():
    assert first_line(ValueError("\n  bad shape (3, 4)\nTraceback detail\n")) == "bad shape (3, 4)"


def test_first_line_of_an_empty_message_names_the_exception():
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert first_line(OSError("   \n ")) == "OSError"


def test_first_line_is_at_most_200_characters():
    assert first_line(RuntimeError("x" * 500)) == "x" * 200
