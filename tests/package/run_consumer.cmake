# Packaging test: builds and runs tests/package/consumer against kvpack the way a user would.
#
#   cmake -DMODE=install|subdirectory -DKVPACK_SOURCE_DIR=... -DKVPACK_BINARY_DIR=...
#         -DCONSUMER_SOURCE_DIR=... -DWORK_DIR=... [-DPREFIX=...] [-DGENERATOR=...]
#         [-DCXX_COMPILER=...] [-DBUILD_TYPE=...] [-DWITH_CUDA=ON|OFF] -P run_consumer.cmake
#
# install:      cmake --install the kvpack build tree into PREFIX, then find_package(kvpack 0.1)
#               from the consumer (CMAKE_PREFIX_PATH=PREFIX); also checks that asking for a
#               component kvpack does not have fails with a message naming it.
# subdirectory: the consumer does add_subdirectory(KVPACK_SOURCE_DIR) and must not get kvpack's
#               own tests, benchmarks or examples.
# Every step that fails stops the test with the command and its full output.
cmake_minimum_required(VERSION 3.20)

foreach(var IN ITEMS MODE KVPACK_SOURCE_DIR KVPACK_BINARY_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

set(configure_args -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
if(GENERATOR)
  list(APPEND configure_args -G ${GENERATOR})
endif()
if(CXX_COMPILER)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()

# run_step(<name> <OUTPUT_VAR> COMMAND ...): runs the command; on failure stops with everything.
function(run_step name out_var)
  list(REMOVE_AT ARGN 0)  # drop the COMMAND keyword
  string(REPLACE ";" " " printable "${ARGN}")
  message(STATUS "[${MODE}] ${name}: ${printable}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[${MODE}] step '${name}' FAILED (exit ${rc})\n"
                        "command: ${printable}\n---- output ----\n${out}\n----------------")
  endif()
  set(${out_var} "${out}" PARENT_SCOPE)
endfunction()

# expect_failure(<name> <must_contain> COMMAND ...): the command must fail and say <must_contain>.
function(expect_failure name must_contain)
  list(REMOVE_AT ARGN 0)
  string(REPLACE ";" " " printable "${ARGN}")
  message(STATUS "[${MODE}] ${name} (must fail): ${printable}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  # CMake wraps long messages; compare with whitespace collapsed.
  string(REGEX REPLACE "[ \t\r\n]+" " " flat "${out}")
  if(rc EQUAL 0)
    message(FATAL_ERROR "[${MODE}] step '${name}' succeeded but must fail\n${out}")
  endif()
  string(FIND "${flat}" "${must_contain}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "[${MODE}] step '${name}' failed without saying \"${must_contain}\"\n"
                        "---- output ----\n${out}\n----------------")
  endif()
endfunction()

function(check_output out expected)
  string(FIND "${out}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "[${MODE}] consumer output lacks \"${expected}\":\n${out}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(consumer_build ${WORK_DIR}/build)

if(MODE STREQUAL "install")
  if(NOT PREFIX)
    message(FATAL_ERROR "run_consumer.cmake: MODE=install needs -DPREFIX=...")
  endif()
  file(REMOVE_RECURSE ${PREFIX})
  # Only kvpack's own component: the headers and the CMake package (not the examples' binaries).
  run_step("install kvpack" out COMMAND ${CMAKE_COMMAND} --install ${KVPACK_BINARY_DIR}
           --prefix ${PREFIX} --component kvpack --config ${BUILD_TYPE})
  file(GLOB_RECURSE config_files ${PREFIX}/*/kvpackConfig.cmake)
  if(NOT EXISTS ${PREFIX}/include/kvpack/kvpack.hpp OR NOT config_files)
    message(FATAL_ERROR "[install] ${PREFIX} lacks include/kvpack/kvpack.hpp or kvpackConfig.cmake")
  endif()

  set(package_args ${configure_args} -DKVPACK_CONSUMER_MODE=package
      -DCMAKE_PREFIX_PATH=${PREFIX} -DKVPACK_EXPECTED_PREFIX=${PREFIX}
      -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  if(WITH_CUDA)
    list(APPEND package_args -DKVPACK_CONSUMER_COMPONENTS=cuda -DKVPACK_CONSUMER_WITH_CUDA=ON)
  endif()
  run_step("configure consumer" out COMMAND ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR}
           -B ${consumer_build} ${package_args})

  # A component kvpack does not offer, and `cuda` from an install that lacks it, must fail and
  # say why.
  expect_failure("unknown component" "unknown component 'bogus'"
                 COMMAND ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${WORK_DIR}/build-bogus
                 ${configure_args} -DKVPACK_CONSUMER_MODE=package -DCMAKE_PREFIX_PATH=${PREFIX}
                 -DKVPACK_CONSUMER_COMPONENTS=bogus)
  if(NOT WITH_CUDA)
    expect_failure("cuda component absent" "installed without CUDA support"
                   COMMAND ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${WORK_DIR}/build-cuda
                   ${configure_args} -DKVPACK_CONSUMER_MODE=package
                   -DCMAKE_PREFIX_PATH=${PREFIX} -DKVPACK_CONSUMER_COMPONENTS=cuda)
  endif()
elseif(MODE STREQUAL "subdirectory")
  set(subdir_args ${configure_args} -DKVPACK_CONSUMER_MODE=subdirectory
      -DKVPACK_SOURCE_DIR=${KVPACK_SOURCE_DIR})
  if(WITH_CUDA)
    list(APPEND subdir_args -DKVPACK_CONSUMER_WITH_CUDA=ON)
  endif()
  run_step("configure consumer" out COMMAND ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR}
           -B ${consumer_build} ${subdir_args})
  if(EXISTS ${consumer_build}/kvpack/tests OR EXISTS ${consumer_build}/kvpack/bench)
    message(FATAL_ERROR "[subdirectory] kvpack's tests/ or bench/ were configured")
  endif()
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE is '${MODE}'; expected install or subdirectory")
endif()

run_step("build consumer" out COMMAND ${CMAKE_COMMAND} --build ${consumer_build}
         --config ${BUILD_TYPE})
find_program(consumer_exe kvpack_consumer PATHS ${consumer_build} ${consumer_build}/${BUILD_TYPE}
             NO_DEFAULT_PATH)
if(NOT consumer_exe)
  message(FATAL_ERROR "[${MODE}] kvpack_consumer was not built in ${consumer_build}")
endif()
run_step("run consumer" out COMMAND ${consumer_exe})
check_output("${out}" "cache.bytes() =")
if(WITH_CUDA)
  check_output("${out}" "KVPACK_HAS_CUDA: yes")
else()
  check_output("${out}" "KVPACK_HAS_CUDA: no")
endif()
message(STATUS "[${MODE}] OK: ${out}")
