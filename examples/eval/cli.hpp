// kvpack-eval's command line: the options, their parsing, and the rows they expand to.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model_path.hpp"
#include "policy_registry.hpp"
#include "runner.hpp"

namespace kvpack {
namespace eval {

/// What the command line asks for (defaults: the demo's frontier, see --help).
struct Options {
  std::vector<std::string> policies{"quant4", "kvzip:keep=0.33", "kvzip+quant4:ratio=8",
                                    "l2:keep=0.33"};
  std::vector<double> keeps{0.5, 0.25};
  std::vector<int> bits{4};
  std::vector<double> thresholds{0.9};
  std::vector<int64_t> lazy_recents{1024};
  std::vector<double> ratios{4.0};
  bool ratios_given = false;  ///< --ratio also sets the eviction rows' budgets
  std::vector<int> xkv_groups{4};
  PolicySpec base;
  Settings settings;
  std::string text_file, tasks_file, json_file, task_kind = "passkey";
  std::string model = kvpack::llama::reference_model_path();
  int num_tasks = 10;
  uint32_t seed = 1;
  int threads = 0;
  bool quiet = false;
  std::string note;  ///< free text copied into the JSON (e.g. the machine's state)
};

/// Parses argv; prints --help and exits 0; throws std::runtime_error naming the bad flag.
Options parse_options(int argc, char** argv);

/// Every (policy, knob) row to run, the full cache first.
std::vector<PolicySpec> expand_rows(const Options& o);

/// What the driver prepares once for every row of `o`: calibration projections and head scores
/// when any row needs them (the other needs are handled per row by the runner).
DriverNeeds driver_needs(const Options& o);

}  // namespace eval
}  // namespace kvpack
