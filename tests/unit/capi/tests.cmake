# unit_capi drives libcompanion.so against a real `companion serve` process (built first).
add_dependencies(${test_target} companion)
target_compile_definitions(${test_target} PRIVATE COMPANION_BINARY="$<TARGET_FILE:companion>")
target_link_libraries(${test_target} PRIVATE nlohmann_json::nlohmann_json Threads::Threads)
set_tests_properties(${test_target} PROPERTIES TIMEOUT 300)

# companion.h is strict C11, and a C program links against libcompanion.so alone.
add_executable(capi_c_check ${CMAKE_CURRENT_LIST_DIR}/c_compile_check.c)
set_target_properties(capi_c_check PROPERTIES C_STANDARD 11 C_STANDARD_REQUIRED ON
  C_EXTENSIONS OFF)
# The project's warning flags include C++-only ones; C gets its own strict set.
get_target_property(capi_c_check_options capi_c_check COMPILE_OPTIONS)
if(capi_c_check_options)
  list(REMOVE_ITEM capi_c_check_options -Wnon-virtual-dtor)
  set_target_properties(capi_c_check PROPERTIES COMPILE_OPTIONS "${capi_c_check_options}")
endif()
target_compile_options(capi_c_check PRIVATE -std=c11 -Wall -Wextra -Werror -pedantic)
target_link_libraries(capi_c_check PRIVATE companion_capi)
add_test(NAME capi_c_check COMMAND capi_c_check)
set_tests_properties(capi_c_check PROPERTIES LABELS "unit")

# libcompanion.so exports exactly the functions of companion.h and of the C++ API (and has the
# right SONAME/deps).
add_test(NAME capi_exported_symbols
  COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/check_symbols.sh $<TARGET_FILE:companion_capi>
    ${PROJECT_SOURCE_DIR}/include/companion/companion.h
    ${PROJECT_BINARY_DIR}/src/capi/companion.map)
set_tests_properties(capi_exported_symbols PROPERTIES LABELS "unit"
  ENVIRONMENT "NM=${CMAKE_NM};OBJDUMP=${CMAKE_OBJDUMP}")

# The view planner behind companion_plan_views, tested directly (it is internal to the library).
target_sources(${test_target} PRIVATE ${PROJECT_SOURCE_DIR}/src/capi/view_plan.cpp)
target_link_libraries(${test_target} PRIVATE companion_common)

# The library's log before any handler was set (capi_log_test.cpp): a process of its own.
add_test(NAME capi_log_default COMMAND ${test_target} --gtest_filter=CapiLogDefault.*)
set_tests_properties(capi_log_default PROPERTIES LABELS "unit")
