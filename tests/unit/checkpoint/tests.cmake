# Reference checkpoints and conversion vectors written by the real safetensors library and torch
# (make_reference.py); unit_checkpoint reads them from COMPANION_TEST_DATA.
add_test(NAME checkpoint_reference_data
  COMMAND ${COMPANION_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/make_reference.py ${test_data_dir})
set_tests_properties(checkpoint_reference_data PROPERTIES
  FIXTURES_SETUP checkpoint_reference_data LABELS "unit")
set_tests_properties(${test_target} PROPERTIES FIXTURES_REQUIRED checkpoint_reference_data)
