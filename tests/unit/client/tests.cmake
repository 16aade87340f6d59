# The client's tests run a real server in the same process (its event loop on a thread).
target_link_libraries(unit_client PRIVATE companion_server)
