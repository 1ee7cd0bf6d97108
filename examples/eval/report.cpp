// kvpack-eval's output (see report.hpp).
#include "report.hpp"

#include <omp.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvpack {
namespace eval {
namespace {

/// "%W.Pf" of x, or "-" right-aligned when x is not finite (not measured for this row).
std::string cell(double x, int width, int precision) {
  char buf[64];
  if (std::isfinite(x)) {
    std::snprintf(buf, sizeof buf, "%*.*f", width, precision, x);
  } else {
    std::snprintf(buf, sizeof buf, "%*s", width, "-");
  }
  return buf;
}

/// x, or null when it is not finite (not measured for this row).
nlohmann::ordered_json number(double x) {
  return std::isfinite(x) ? nlohmann::ordered_json(x) : nlohmann::ordered_json(nullptr);
}

}  // namespace

void print_table(const std::vector<PolicyResult>& rows, const Settings& s) {
  if (!s.run_text && !s.run_retrieval) return;  // the decoding test alone has its own table
  std::printf("\n%-26s %8s %9s %9s %9s %9s %9s %10s %10s %10s\n", "policy", "bytes_x", "agree@1",
              "agr_dec", "kl", "ppl", "retrieval", "prefill/s", "decode/s", "compress_s");
  for (const auto& r : rows) {
    const double ratio = s.run_text ? r.bytes_ratio : r.retrieval_bytes_ratio;
    const double retrieval = r.retrieval_asked > 0 ? r.retrieval_acc : NAN;
    std::printf("%-26s %s %s %s %s %s %s %s %s %s\n", r.label.c_str(), cell(ratio, 8, 2).c_str(),
                cell(s.run_text ? r.text.agreement_top1 : NAN, 9, 3).c_str(),
                cell(s.run_text ? r.text.agreement_decisive : NAN, 9, 3).c_str(),
                cell(s.run_text ? r.text.kl : NAN, 9, 4).c_str(),
                cell(s.run_text ? r.text.perplexity : NAN, 9, 2).c_str(),
                cell(retrieval, 9, 3).c_str(), cell(r.prefill_tokens_per_s(), 10, 1).c_str(),
                cell(r.decode_tokens_per_s(), 10, 1).c_str(),
                cell(r.score_seconds + r.compress_seconds, 10, 3).c_str());
  }
  std::printf(
      "\nbytes_x = dense fp16 bytes / bytes held after compress(), measured; agree@1 and kl "
      "against the full cache over %lld continuation tokens after %lld context tokens; agr_dec = "
      "agree@1 where the full cache's top-1 probability leads the runner-up by >= %.2f; "
      "prefill/s once per context on the full cache (every row starts from a copy of it); "
      "decode/s greedy steps over the row's cache; compress_s = scoring passes + compress(), "
      "summed over contexts.\n",
      static_cast<long long>(s.continuation), static_cast<long long>(s.context), kDecisiveMargin);
}

void print_decoding_table(const std::vector<PolicyResult>& rows, const Settings& s) {
  if (s.decode_tokens <= 0) return;
  std::printf("\n%-26s %8s %9s %9s %9s %9s %10s\n", "decoding test", "bytes_x", "agree@1",
              "agr_dec", "kl", "ppl", "compress_s");
  for (const auto& r : rows) {
    std::printf("%-26s %s %s %s %s %s %s\n", r.label.c_str(),
                cell(r.decoding_bytes_ratio, 8, 2).c_str(),
                cell(r.decoding.agreement_top1, 9, 3).c_str(),
                cell(r.decoding.agreement_decisive, 9, 3).c_str(),
                cell(r.decoding.kl, 9, 4).c_str(), cell(r.decoding.perplexity, 9, 2).c_str(),
                cell(r.decoding_compress_seconds, 10, 3).c_str());
  }
  std::printf(
      "\nDecoding test: after the %lld-token context (compressed once, as in the text run) the "
      "text's next token and %lld - 1 the full cache generates (%s) are fed to every row, %lld at "
      "a time, each step followed by compress(); bytes_x after the last compress(); agree@1 and kl "
      "against the full cache fed the same way; compress_s = the compress() calls while "
      "decoding.\n",
      static_cast<long long>(s.context), static_cast<long long>(s.decode_tokens),
      s.decode_temperature > 0 ? ("sampled at temperature " + cell(s.decode_temperature, 0, 2) +
                                  ", seed " + std::to_string(s.decode_seed))
                                     .c_str()
                               : "greedy",
      static_cast<long long>(s.compress_every));
}

void print_reading(const std::vector<PolicyResult>& rows, const Settings& s) {
  if (rows.size() < 2) return;
  const PolicyResult& full = rows[0];
  const auto ratio = [&](const PolicyResult& r) {
    return s.run_text ? r.bytes_ratio : r.retrieval_bytes_ratio;
  };
  const auto answers = [](const PolicyResult& r) {
    return std::to_string(r.retrieval_correct) + "/" + std::to_string(r.retrieval_asked);
  };
  const auto quality = [&](const PolicyResult& r) {
    return s.run_text ? ", KL " + cell(r.text.kl, 0, 3) + " vs the full cache" : std::string();
  };
  if (full.retrieval_asked == 0) return;
  const PolicyResult* best = nullptr;
  const PolicyResult* worst = nullptr;
  for (std::size_t i = 1; i < rows.size(); ++i) {
    const PolicyResult& r = rows[i];
    if (r.retrieval_correct >= full.retrieval_correct && (!best || ratio(r) > ratio(*best))) {
      best = &r;
    }
    if (!worst || r.retrieval_correct < worst->retrieval_correct) worst = &r;
  }
  std::printf("\nReading: the full cache answers %s questions.", answers(full).c_str());
  if (best) {
    std::printf(" %s holds %.1fx less memory and answers %s%s.", best->label.c_str(), ratio(*best),
                answers(*best).c_str(), quality(*best).c_str());
  } else {
    std::printf(" No compressed row answers as many.");
  }
  if (worst && worst->retrieval_correct < full.retrieval_correct) {
    std::printf(" %s (%.1fx) answers %s%s.", worst->label.c_str(), ratio(*worst),
                answers(*worst).c_str(), quality(*worst).c_str());
  }
  std::printf("\n");
}

void write_json(const std::string& path, const Options& o, const std::vector<PolicyResult>& rows,
                double gemm_flops_per_s) {
  const bool text = o.settings.run_text;
  nlohmann::ordered_json doc;
  doc["model"] = o.model;
  doc["threads"] = omp_get_max_threads();
  doc["gemm_flops_per_s"] = number(gemm_flops_per_s);
  doc["prefill_flops_per_s"] = number(rows.at(0).prefill_flops_per_s());
  doc["note"] = o.note;
  doc["context"] = o.settings.context;
  doc["continuation"] = o.settings.continuation;
  doc["decode_tokens"] = o.settings.decode_tokens;
  doc["compress_every"] = o.settings.compress_every;
  doc["decode_temperature"] = o.settings.decode_temperature;
  doc["decode_seed"] = o.settings.decode_seed;
  doc["num_tasks"] = o.num_tasks;
  doc["task_kind"] = o.tasks_file.empty() ? o.task_kind : "file:" + o.tasks_file;
  auto& results = doc["results"] = nlohmann::ordered_json::array();
  for (const auto& r : rows) {
    nlohmann::ordered_json row;
    row["policy"] = r.label;
    row["bytes_ratio"] = number(r.bytes_ratio);
    row["retrieval_bytes_ratio"] = number(r.retrieval_bytes_ratio);
    row["agreement_top1"] = number(text ? r.text.agreement_top1 : NAN);
    row["agreement_decisive"] = number(text ? r.text.agreement_decisive : NAN);
    row["decisive_positions"] = r.text.decisive_positions;
    row["kl"] = number(text ? r.text.kl : NAN);
    row["perplexity"] = number(text ? r.text.perplexity : NAN);
    row["retrieval_acc"] = number(r.retrieval_asked > 0 ? r.retrieval_acc : NAN);
    row["prefill_tokens_per_s"] = number(r.prefill_tokens_per_s());
    row["decode_tokens_per_s"] = number(r.decode_tokens_per_s());
    row["retrieval_asked"] = r.retrieval_asked;
    row["score_seconds"] = number(r.score_seconds);
    row["compress_seconds"] = number(r.compress_seconds);
    if (o.settings.decode_tokens > 0) {
      auto& d = row["decoding"];
      d["bytes_ratio"] = number(r.decoding_bytes_ratio);
      d["agreement_top1"] = number(r.decoding.agreement_top1);
      d["agreement_decisive"] = number(r.decoding.agreement_decisive);
      d["decisive_positions"] = r.decoding.decisive_positions;
      d["kl"] = number(r.decoding.kl);
      d["perplexity"] = number(r.decoding.perplexity);
      d["compress_seconds"] = number(r.decoding_compress_seconds);
    }
    if (r.lazy_layers >= 0) {
      row["lazy_layers"] = r.lazy_layers;
      auto& mass = row["layer_mass"] = nlohmann::ordered_json::array();
      for (const auto& context : r.layer_mass) {
        auto& layers = mass.emplace_back(nlohmann::ordered_json::array());
        for (double m : context) layers.push_back(number(m));
      }
    }
    results.push_back(std::move(row));
  }
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
  out << doc.dump(2) << "\n";
  if (!out) throw std::runtime_error("write to '" + path + "' failed");
}

}  // namespace eval
}  // namespace kvpack
