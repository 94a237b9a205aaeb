"""Only the error root is an `error:` line: any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from regionspot_cache import errors

# rs-cache inspect with the cache code replaced by one that fails as a bug would.
BROKEN_INSPECT = """
import sys
import regionspot_cache.cache as cache

def broken(*args, **kwargs):
    raise {error}("{message}")

cache.inspect_cache = broken
from regionspot_cache import cli

sys.argv = ["rs-cache", "inspect", sys.argv[1]]
cli.main()
"""


def run_broken_inspect(tmp_path, error: str, message: str) -> subprocess.CompletedProcess:
    code = BROKEN_INSPECT.format(error=error, message=message)
    return subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)


def test_a_plain_value_error_is_a_bug_with_its_traceback(tmp_path):
    result = run_broken_inspect(tmp_path, "ValueError", "a bug, not the user's")
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "ValueError: a bug, not the user's" in result.stderr
    assert "error:" not in result.stderr


def test_an_error_of_the_root_is_one_line(tmp_path):
    result = run_broken_inspect(tmp_path, "__import__('regionspot_cache.errors').errors.InputError", "fix your input")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and " ".join(result.stderr.split()) == "error: fix your input"


@pytest.mark.parametrize("name", [name for name in dir(errors) if name.endswith("Error")])
def test_every_error_type_is_under_the_root(name):
    assert issubclass(getattr(errors, name), errors.RegionSpotCacheError)


def test_value_errors_stay_value_errors_and_missing_files_file_not_found_errors():
    """Callers that caught the built-in types before the root existed keep working."""
    for error in (
        errors.ConfigError,
        errors.DatasetError,
        errors.CacheFormatError,
        errors.ImageDecodeError,
        errors.ModelLoadError,
        errors.ExtractionError,
        errors.NonFiniteValueError,
    ):
        assert issubclass(error, ValueError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
