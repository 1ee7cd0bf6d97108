// kvpack-eval: compares kvpack policies with the full cache on the reference model, at measured
// memory: next-token agreement and KL on a long text, perplexity, and query-agnostic retrieval.
// cli.cpp reads the command line, runner.cpp runs the model, report.cpp writes the results.

#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.hpp"
#include "gguf.hpp"
#include "model.hpp"
#include "report.hpp"
#include "runner.hpp"
#include "tasks.hpp"
#include "tokenizer.hpp"

int main(int argc, char** argv) {
#if defined(KVPACK_TOOLS_UNOPTIMIZED)
  std::fprintf(stderr,
               "kvpack-eval: built with KVPACK_TOOLS_OPTIMIZE=OFF (-O0, a compile check): slow, "
               "timings mean nothing; rebuild with -DKVPACK_TOOLS_OPTIMIZE=ON\n");
#endif
  try {
    const kvpack::eval::Options o = kvpack::eval::parse_options(argc, argv);
    if (o.threads > 0) {
      omp_set_num_threads(o.threads);  // the model's matmuls
      // kvpack's default pool reads it when a cache first runs a parallel loop (below).
      setenv("KVPACK_NUM_THREADS", std::to_string(o.threads).c_str(), 1);
    }
    kvpack::eval::ProgressBar bar(!o.quiet);
    const auto file = kvpack::llama::GgufFile::open(o.model);
    const auto tokenizer = kvpack::llama::Tokenizer::from_gguf(file);
    const auto model = kvpack::llama::LlamaModel::from_gguf(file);
    // What the rows' policies need from the driver besides their own rows.
    const kvpack::eval::DriverNeeds needs = kvpack::eval::driver_needs(o);
    kvpack::eval::Settings settings = o.settings;
    settings.capture_hidden = needs.hidden_scorer;  // kvzap rows score the captured prefill
    kvpack::eval::Runner runner(model, tokenizer, settings);
    if (needs.hidden_scorer) runner.set_kvzap_documents(kvpack::eval::kvzap_documents());
    const bool calibrate = needs.projections, head_level = needs.head_scores;
    std::vector<int32_t> text;
    if (o.settings.run_text || o.settings.decode_tokens > 0 || calibrate) {
      text = tokenizer.encode(o.text_file.empty() ? kvpack::eval::default_text()
                                                  : kvpack::eval::read_file(o.text_file));
    }
    if (calibrate) {
      // The end of the text, away from the scored window at its start.
      const std::size_t n = std::min<std::size_t>(1024, text.size() / 2);
      runner.set_calibration_tokens(std::vector<int32_t>(text.end() - n, text.end()));
    }
    if (head_level) {
      runner.set_head_sample(
          kvpack::eval::make_passkey_tasks(tokenizer, o.settings.context, 1, o.seed + 1000003u)[0]
              .context);
    }
    std::vector<kvpack::eval::RetrievalTask> tasks;
    if (o.settings.run_retrieval) {
      if (!o.tasks_file.empty()) {
        tasks = kvpack::eval::load_tasks_jsonl(o.tasks_file);
      } else if (o.task_kind == "kv") {
        tasks = kvpack::eval::make_kv_tasks(tokenizer, o.settings.context, o.num_tasks, o.seed);
      } else {
        tasks =
            kvpack::eval::make_passkey_tasks(tokenizer, o.settings.context, o.num_tasks, o.seed);
      }
    }

    const auto specs = kvpack::eval::expand_rows(o);
    std::vector<kvpack::eval::PolicyResult> rows(specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) rows[i].label = specs[i].label();
    std::string phase;
    auto progress = [&](const std::string& stage, double f) { bar.update(phase, stage, f); };
    if (o.settings.run_text) {
      phase = "text";
      runner.run_text(specs, text, rows, progress);
      bar.done();
      std::fprintf(stderr, "text done\n");
    }
    if (o.settings.decode_tokens > 0) {
      phase = "decoding";
      runner.run_decoding(specs, text, rows, progress);
      bar.done();
      std::fprintf(stderr, "decoding test done\n");
    }
    if (o.settings.run_retrieval) {
      phase = "retrieval";
      // Partial results survive an interrupted long run.
      auto save = [&] {
        if (!o.json_file.empty()) kvpack::eval::write_json(o.json_file, o, rows, NAN);
      };
      runner.run_retrieval(specs, tasks, rows, progress, save);
      bar.done();
      std::fprintf(stderr, "retrieval done\n");
    }
    kvpack::eval::print_table(rows, o.settings);
    kvpack::eval::print_decoding_table(rows, o.settings);
    kvpack::eval::print_reading(rows, o.settings);
    // Same-run baseline for the prefill rate: Eigen GEMM at the MLP shape of one prefill chunk.
    const double gemm =
        kvpack::eval::measure_gemm_flops_per_s(model.config(), model.chunk_size(), 2.0);
    if (rows[0].prefill_tokens > 0)
      std::printf(
          "prefill: %.1f GFLOP/s (matmuls + attention, %.0f tokens) = %.2f of this machine's fp32 "
          "GEMM, %.1f GFLOP/s at (%lld x %d)(%d x %d), %d threads, measured in this run\n",
          rows[0].prefill_flops_per_s() * 1e-9, rows[0].prefill_tokens,
          rows[0].prefill_flops_per_s() / gemm, gemm * 1e-9,
          static_cast<long long>(model.chunk_size()), model.config().hidden, model.config().hidden,
          model.config().ffn, omp_get_max_threads());
    if (!o.json_file.empty()) kvpack::eval::write_json(o.json_file, o, rows, gemm);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "kvpack-eval: " << e.what() << "\n";
    return 2;
  }
}
