# unit_protocol builds some malformed messages with FlatBuffers directly: it needs the header
# flatc generates from companion.fbs (and the FlatBuffers headers, header-only for this use).
add_dependencies(${test_target} companion_schema)
target_include_directories(${test_target} PRIVATE ${CMAKE_BINARY_DIR}/src/protocol/generated)
get_target_property(unit_protocol_fb_include flatbuffers::flatbuffers INTERFACE_INCLUDE_DIRECTORIES)
target_include_directories(${test_target} SYSTEM PRIVATE ${unit_protocol_fb_include})
