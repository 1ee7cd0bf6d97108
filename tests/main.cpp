// Catch2 v2 main for the CPU unit tests (tests/cpu/*.cpp); compiled once, linked into kvpack_tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
