"""The error classes mirror include/companion/status_codes.h, and failures map to them."""
import pathlib
import pickle
import re

import pytest

import companion
from companion import errors

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse_status_codes_h():
    text = (REPO / "include" / "companion" / "status_codes.h").read_text()
    rows = re.findall(r'X\((\w+),\s*(\w+),\s*(\d+),\s*"([^"]*)"\)', text)
    assert rows, "no X(...) rows found in status_codes.h"
    return [(c, cpp, int(v), d) for c, cpp, v, d in rows]


def test_table_matches_status_codes_h_exactly():
    assert [tuple(row) for row in errors.STATUS_CODES] == parse_status_codes_h()


def test_one_class_per_code_with_the_header_names():
    for c_name, cpp_name, value, description in parse_status_codes_h():
        if value == 0:
            assert 0 not in errors.ERROR_CLASSES
            continue
        cls = getattr(companion, cpp_name)
        assert cls is errors.ERROR_CLASSES[value]
        assert issubclass(cls, companion.Error)
        assert cls.code == value and cls.code_name == c_name
        e = errors.error_for_code(value, "details")
        assert type(e) is cls and e.code == value and e.code_name == c_name
        assert e.message == "details" and str(e) == f"{description}: details"
        assert pickle.loads(pickle.dumps(e)).message == "details"


def test_python_bases():
    assert issubclass(companion.Timeout, TimeoutError)
    assert issubclass(companion.InvalidArgument, ValueError)
    assert issubclass(companion.LibraryNotFound, companion.Error)
    with pytest.raises(TimeoutError):
        raise companion.Timeout("slow")
    unknown = errors.error_for_code(99, "?")
    assert type(unknown) is companion.Error and unknown.code == 99


def test_library_messages_reach_the_exception(client, model_root, tmp_path):
    with pytest.raises(companion.NotFound) as e:
        client.load(str(model_root / "missing"))
    assert "missing" in e.value.message and e.value.code_name == "NOT_FOUND"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((model_root / "mixed" / "model.safetensors").read_bytes())
    with pytest.raises(companion.NotPermitted):
        client.load(str(outside))
    with pytest.raises(companion.NotPermitted):
        client.get_model_parameters(str(outside))
    for bad in ("fp13", "int8"):
        with pytest.raises(companion.UnknownDtype):
            client.load(companion.ModelSpec(str(model_root / "opt-f32"), dtype=bad))
    with pytest.raises(companion.InvalidArgument):  # a shard, but no rules for this architecture
        client.load(companion.ModelSpec(str(model_root / "mixed"), tp_size=2))
    with pytest.raises(companion.InvalidArgument):
        client.load("no/such/relative/path")  # absolute paths or "org/name" only
    with pytest.raises(companion.NotFound):
        client.unload("0123456789ab")
    with pytest.raises(companion.BadCheckpoint):
        client.load(str(model_root / "truncated"))
    # A failed load is listed with its error, which maps to the same class.
    failed = [m for m in client.list() if m.source == str(model_root / "truncated")]
    assert failed and failed[0].state == "error" and failed[0].error_code == "BAD_CHECKPOINT"
    assert isinstance(failed[0].error, companion.BadCheckpoint)
    assert failed[0].error.message == failed[0].error_message


def test_no_server_is_unavailable(runtime_dir):
    with pytest.raises(companion.Unavailable) as e:
        companion.connect(namespace="nobody-here", runtime_dir=runtime_dir)
    assert "nobody-here" in str(e.value)
