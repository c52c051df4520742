"""Shared by the command-line tests."""


def assert_one_line_error(r, *fragments):
    """A finished subprocess failed with exactly one line on stderr holding every fragment."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
