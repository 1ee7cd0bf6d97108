// kvpack-eval's output: the table, the one-line reading, the JSON file, the progress bar.
#pragma once

#include <unistd.h>

#include <iostream>
#include <string>
#include <vector>

#include "cli.hpp"
#include "runner.hpp"

namespace kvpack {
namespace eval {

/// The results table on stdout, with its legend.
void print_table(const std::vector<PolicyResult>& rows, const Settings& s);

/// The decoding test's table (Settings::decode_tokens > 0; nothing otherwise), with its legend.
void print_decoding_table(const std::vector<PolicyResult>& rows, const Settings& s);

/// One line that reads the table: the most compressed row that answers as many retrieval
/// questions as the full cache, and the row that answers fewest. Computed from the rows.
void print_reading(const std::vector<PolicyResult>& rows, const Settings& s);

/// The run as JSON (nlohmann/json): settings, machine facts and one object per row; values not
/// measured for a row are null. `gemm_flops_per_s` is the same-run GEMM baseline (NaN: not yet
/// measured, as in the partial file written after each retrieval task).
void write_json(const std::string& path, const Options& o, const std::vector<PolicyResult>& rows,
                double gemm_flops_per_s);

/// Progress on stderr: a bar redrawn in place on a terminal; in a file or a pipe, a few plain
/// lines (the start of each phase and every ~10 %), not hundreds of carriage-return frames.
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled), terminal_(isatty(STDERR_FILENO)) {}
  void update(const std::string& phase, const std::string& stage, double fraction) {
    if (!enabled_) return;
    if (!terminal_) {
      const int tenth = static_cast<int>(fraction * 10);
      if (phase == phase_ && tenth <= tenth_) return;
      phase_ = phase;
      tenth_ = tenth;
      std::cerr << phase << ": " << static_cast<int>(fraction * 100) << " % (" << stage << ")\n";
      return;
    }
    const int width = 24, filled = static_cast<int>(fraction * width);
    std::cerr << "\r\033[K" << phase << " [" << std::string(filled, '#')
              << std::string(width - filled, '.') << "] " << stage << std::flush;
  }
  void done() {
    if (enabled_ && terminal_) std::cerr << "\r\033[K" << std::flush;
  }

 private:
  bool enabled_;
  bool terminal_;
  std::string phase_;
  int tenth_ = -1;
};

}  // namespace eval
}  // namespace kvpack
