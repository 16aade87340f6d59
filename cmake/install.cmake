# `cmake --install`: the `companion` command, libcompanion.so (C ABI and C++ API) with its public
# headers, and what lets other projects find them: the CMake package Companion (target
# Companion::companion) and the pkg-config module companion. Tests, tools and benchmarks are not
# installed. The library is self-contained (its static dependencies are linked in), so the
# exported target carries no link dependency.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(COMPANION_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/Companion)

install(TARGETS companion RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(TARGETS companion_capi EXPORT CompanionTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/companion
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} FILES_MATCHING PATTERN "*.h" PATTERN "*.hpp")

install(EXPORT CompanionTargets NAMESPACE Companion:: DESTINATION ${COMPANION_CMAKE_DIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/CompanionConfig.cmake.in
  ${PROJECT_BINARY_DIR}/CompanionConfig.cmake INSTALL_DESTINATION ${COMPANION_CMAKE_DIR})
# The soname (libcompanion.so.0) is the C ABI's promise: any 0.x satisfies a request for 0.y.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/CompanionConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/CompanionConfig.cmake
  ${PROJECT_BINARY_DIR}/CompanionConfigVersion.cmake DESTINATION ${COMPANION_CMAKE_DIR})

# companion.pc names the prefix given at install time (cmake --install --prefix P), so it is
# written then, not at configure time.
foreach(dir LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${dir}}")
    set(COMPANION_PC_${dir} "${CMAKE_INSTALL_${dir}}")
  else()
    set(COMPANION_PC_${dir} "\${prefix}/${CMAKE_INSTALL_${dir}}")
  endif()
endforeach()
set(COMPANION_PC_PREFIX "@COMPANION_PC_PREFIX@")  # filled in at install time
configure_file(${CMAKE_CURRENT_LIST_DIR}/companion.pc.in ${PROJECT_BINARY_DIR}/companion.pc.in
  @ONLY)
install(CODE "
  set(COMPANION_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  configure_file(\"${PROJECT_BINARY_DIR}/companion.pc.in\" \"${PROJECT_BINARY_DIR}/companion.pc\"
    @ONLY)")
install(FILES ${PROJECT_BINARY_DIR}/companion.pc
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
