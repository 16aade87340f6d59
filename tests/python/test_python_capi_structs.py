"""The package's ctypes structs and libcompanion.so's struct sizes: the package passes the size
of its own structs, and the library writes nothing past the struct of a caller older than it (a
test-local copy of a package struct without its newest fields, followed by a canary)."""
import ctypes

import pytest

from companion import _lib

CANARY = 0xC3
CANARY_BYTES = 32


def guarded(struct_type):
    """An instance of struct_type filled with 0xAB, in a buffer whose CANARY_BYTES after it hold
    CANARY; returns (instance, buffer)."""
    size = ctypes.sizeof(struct_type)
    buffer = ctypes.create_string_buffer(b"\xab" * size + bytes([CANARY]) * CANARY_BYTES,
                                         size + CANARY_BYTES)
    return struct_type.from_buffer(buffer), buffer


def canary_intact(struct_type, buffer):
    size = ctypes.sizeof(struct_type)
    return buffer.raw[size:size + CANARY_BYTES] == bytes([CANARY]) * CANARY_BYTES


def older(struct_type, dropped):
    """struct_type as an older package declared it: without its last `dropped` fields."""
    fields = struct_type._fields_[:-dropped]
    return type(f"Older{struct_type.__name__}", (ctypes.Structure,), {"_fields_": fields})


def as_current(instance, struct_type):
    return ctypes.cast(ctypes.pointer(instance), ctypes.POINTER(struct_type))


INITS = [  # (package struct, init name, fields its newest header added last)
    (_lib.ConnectOptions, "companion_connect_options_init", 1),
    (_lib.ModelSpecC, "companion_model_spec_init", 1),
    (_lib.AttachOptionsC, "companion_attach_options_init", 1),
    (_lib.ModelTableC, "companion_model_table_init", 1),
]


@pytest.mark.parametrize("struct_type,name,dropped", INITS,
                         ids=[name for _, name, _ in INITS])
def test_the_package_inits_fill_their_own_structs(struct_type, name, dropped):
    """Through the package's bindings: struct_size is the package struct's size."""
    instance, buffer = guarded(struct_type)
    _lib.function(name)(ctypes.byref(instance))
    assert canary_intact(struct_type, buffer)
    assert instance.struct_size == ctypes.sizeof(struct_type)


@pytest.mark.parametrize("struct_type,name,dropped", INITS,
                         ids=[name for _, name, _ in INITS])
def test_an_older_package_struct_is_not_written_past(struct_type, name, dropped):
    old_type = older(struct_type, dropped)
    instance, buffer = guarded(old_type)
    _lib.function(name + "_sized")(as_current(instance, struct_type), ctypes.sizeof(old_type))
    assert canary_intact(old_type, buffer)
    assert instance.struct_size == ctypes.sizeof(old_type)


def test_older_structs_get_the_defaults_they_have_room_for():
    options_type = older(_lib.ConnectOptions, 1)
    options, _ = guarded(options_type)
    _lib.function("companion_connect_options_init_sized")(
        as_current(options, _lib.ConnectOptions), ctypes.sizeof(options_type))
    assert (options.ns, options.device, options.socket_path) == (b"companion", b"host", None)
    attach_type = older(_lib.AttachOptionsC, 1)
    attach, _ = guarded(attach_type)
    _lib.function("companion_attach_options_init_sized")(
        as_current(attach, _lib.AttachOptionsC), ctypes.sizeof(attach_type))
    assert (attach.generation, attach.wait, attach.or_source) == (0, 1, 0)


@pytest.fixture
def raw_model(server, model_root):
    """A companion_model handle of opt-f32, through the C calls themselves."""
    lib = _lib.load_library()
    options = _lib.ConnectOptions()
    lib.companion_connect_options_init(ctypes.byref(options))
    socket = server.socket.encode()
    options.socket_path = socket
    client = ctypes.c_void_p()
    _lib.check(lib.companion_client_connect(ctypes.byref(options), ctypes.byref(client)))
    spec = _lib.ModelSpecC()
    lib.companion_model_spec_init(ctypes.byref(spec))
    source = str(model_root / "opt-f32").encode()
    spec.source = source
    model = ctypes.c_void_p()
    try:
        _lib.check(lib.companion_client_get_model_parameters(client, ctypes.byref(spec), 60.0,
                                                             ctypes.byref(model)))
        yield model
    finally:
        if model:
            lib.companion_model_release(model)
        lib.companion_client_close(client)


def test_tensor_calls_write_only_the_callers_struct(raw_model):
    lib = _lib.load_library()
    full, full_buffer = guarded(_lib.TensorC)
    _lib.check(lib.companion_model_tensor(raw_model, 1, ctypes.byref(full)))
    assert canary_intact(_lib.TensorC, full_buffer)
    assert full.device_type == 1 and full.device_id == 0  # CPU
    name = ctypes.string_at(full.name, full.name_length)

    old_type = older(_lib.TensorC, 2)  # before device_type and device_id
    for call, key in (("companion_model_tensor_sized", 1),
                      ("companion_model_find_sized", name)):
        old, buffer = guarded(old_type)
        _lib.check(_lib.function(call)(raw_model, key, as_current(old, _lib.TensorC),
                                       ctypes.sizeof(old_type)))
        assert canary_intact(old_type, buffer), call
        assert ctypes.string_at(old.name, old.name_length) == name, call
        assert (old.data, old.nbytes, old.ndim) == (full.data, full.nbytes, full.ndim), call

    found, found_buffer = guarded(_lib.TensorC)
    _lib.check(lib.companion_model_find(raw_model, name, ctypes.byref(found)))
    assert canary_intact(_lib.TensorC, found_buffer)
    assert found.data == full.data
