// kvpack-eval: compares kvpack policies with the full cache on the reference model, at measured
// memory: next-token agreement and KL on a long text, perplexity, and query-agnostic retrieval.

#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "model.hpp"
#include "model_path.hpp"
#include "policy_registry.hpp"
#include "runner.hpp"
#include "tasks.hpp"
#include "tokenizer.hpp"

namespace {

using kvpack::eval::PolicyResult;
using kvpack::eval::PolicySpec;

const char* kHelp =
    "usage: kvpack-eval [options]\n"
    "Runs the reference model with the full cache and with each policy, and prints a table\n"
    "(and JSON with --json). Every policy is compared with the full cache on the same inputs.\n"
    "\n"
    "Policies:\n"
    "  --policy LIST        comma-separated policy names (listed below); NAME+quant\n"
    "                       applies 4-bit KIVI to what NAME keeps (quantized bases /\n"
    "                       latents for xkv and cskv, ranks priced at the quantized\n"
    "                       bytes); a quant name may carry its bits (quant2, lazy+quant4,\n"
    "                       xkv+quant4), and any name its own budget, overriding --keep /\n"
    "                       --ratio for that row: NAME:keep=K or NAME:ratio=R\n"
    "                       (kvzip:keep=0.33, xkv:ratio=8)\n"
    "                       (default: quant4,kvzip:keep=0.33,kvzip+quant4:ratio=8,\n"
    "                       l2:keep=0.33, the frontier the demo shows; 'full' always\n"
    "                       runs first as the reference)\n"
    "  --keep LIST          keep ratios in (0, 1] of the eviction policies (default\n"
    "                       0.5,0.25)\n"
    "  --ratio LIST         target bytes ratios (dense fp16 / held): xkv and cskv ranks\n"
    "                       (default 4); given explicitly, l2/kvzip rows too, instead of\n"
    "                       --keep: keep = R_store / R, R_store the ratio of the storage\n"
    "                       stage alone (fp16 rows, or KIVI for +quant) measured on the\n"
    "                       same context\n"
    "  --bits LIST          quantization bits, 2/4/8 (default 4)\n"
    "  --group N            quantization group size (default 32)\n"
    "  --residual N         newest tokens kept in fp16 by quant (default 128)\n"
    "  --threshold LIST     LazyLayerDrop thresholds (default 0.9, from the mass measured on\n"
    "                       SmolLM2, docs/evaluation.md)\n"
    "  --lazy-recent LIST   LazyLayerDrop recent windows in tokens (default 1024)\n"
    "  --sinks N            protected first tokens (default: the system prompt, or 4)\n"
    "  --xkv-group LIST     CrossLayerSVD layers per group (default 4)\n"
    "  --cskv-window N      ChannelShrink exact window (default 32); its projections are\n"
    "                       calibrated on the last 1024 tokens of the text\n"
    "Inputs:\n"
    "  --context N          context tokens compressed before scoring (default 2048)\n"
    "  --continuation N     teacher-forced tokens for agreement/KL/perplexity (default 128)\n"
    "  --text FILE          long text for agreement/KL/perplexity (default: Debian's license\n"
    "                       texts in /usr/share/common-licenses)\n"
    "  --tasks FILE         JSONL retrieval tasks {\"context\",\"question\",\"answer\"[,\n"
    "                       \"answer_prefix\"]} (default: generated passkey tasks)\n"
    "  --task-kind KIND     generated tasks: passkey (default) or kv\n"
    "  --num-tasks N        generated tasks (default 10)\n"
    "  --seed N             seed of the generated tasks (default 1)\n"
    "  --no-text            skip agreement/KL/perplexity\n"
    "  --no-retrieval       skip retrieval\n"
    "  --max-new-tokens N   greedy tokens per answer (default 10)\n"
    "  --repeat-chunk N     KVzip repeat chunk in tokens (default 2000)\n"
    "  --head-scores FILE   kvzip-head: load head scores from FILE, or score one sample (a\n"
    "                       passkey context of --context tokens, seed + 1000003, not one of\n"
    "                       the evaluated inputs) and write them there\n"
    "Output and machine:\n"
    "  --json FILE          also write the results as JSON\n"
    "  --model PATH         GGUF model (default: $KVPACK_MODEL or the kvpack cache)\n"
    "  --threads N          OpenMP threads (default: all cores)\n"
    "  --quiet              no progress bar\n"
    "  --note TEXT          free text stored in the JSON (e.g. what else ran)\n"
    "  --verbose            print each retrieval answer (expected, generated) on stderr\n"
    "  -h, --help           this text\n";

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  if (out.empty()) throw std::runtime_error("empty list '" + s + "'");
  return out;
}

double parse_double(const std::string& flag, const std::string& v, double lo, double hi) {
  std::size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || !(x >= lo && x <= hi)) {
    std::ostringstream os;
    os << flag << ": '" << v << "' is not a number in [" << lo << ", " << hi << "]";
    throw std::runtime_error(os.str());
  }
  return x;
}

int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  const double x = parse_double(flag, v, static_cast<double>(lo), static_cast<double>(hi));
  if (x != std::floor(x)) throw std::runtime_error(flag + ": '" + v + "' is not an integer");
  return static_cast<int64_t>(x);
}

/// The budget a --policy item carries after its name ("kvzip:keep=0.33", "xkv:ratio=8").
struct RowBudget {
  std::string name;    ///< the item without its budget
  double keep = NAN;   ///< keep ratio, when given
  double ratio = NAN;  ///< target bytes ratio, when given
};

RowBudget row_budget(const std::string& written) {
  RowBudget b;
  const auto colon = written.find(':');
  b.name = written.substr(0, colon);
  if (colon == std::string::npos) return b;
  const std::string knob = written.substr(colon + 1);
  const std::string flag = "--policy " + written;
  if (knob.rfind("keep=", 0) == 0) {
    b.keep = parse_double(flag, knob.substr(5), 1e-6, 1.0);
  } else if (knob.rfind("ratio=", 0) == 0) {
    b.ratio = parse_double(flag, knob.substr(6), 1.0001, 1e4);
  } else {
    throw std::runtime_error(flag + ": expected NAME:keep=K or NAME:ratio=R after the name");
  }
  return b;
}

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
  kvpack::eval::Settings settings;
  std::string text_file, tasks_file, json_file, task_kind = "passkey";
  std::string model = kvpack::llama::reference_model_path();
  int num_tasks = 10;
  uint32_t seed = 1;
  int threads = 0;
  bool quiet = false;
  std::string note;  ///< free text copied into the JSON (e.g. the machine's state)
};

Options parse(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::runtime_error(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << kHelp << "\nPolicy names (--policy):\n";
      for (const auto& e : kvpack::eval::policy_registry()) {
        std::printf("  %-19s  %s%s\n", e.name.c_str(), e.help.c_str(),
                    e.composes ? " [+quant]" : "");
      }
      std::exit(0);
    } else if (a == "--policy") {
      o.policies = split(value(i));
      for (const auto& written : o.policies) {
        // Checks the budget suffix, the name and any bits written into it.
        kvpack::eval::resolve_policy(row_budget(written).name);
      }
    } else if (a == "--keep") {
      o.keeps.clear();
      for (const auto& k : split(value(i))) o.keeps.push_back(parse_double(a, k, 1e-6, 1.0));
    } else if (a == "--bits") {
      o.bits.clear();
      for (const auto& b : split(value(i))) {
        const int bits = static_cast<int>(parse_int(a, b, 2, 8));
        if (bits != 2 && bits != 4 && bits != 8) throw std::runtime_error("--bits: 2, 4 or 8");
        o.bits.push_back(bits);
      }
    } else if (a == "--threshold") {
      o.thresholds.clear();
      for (const auto& t : split(value(i))) o.thresholds.push_back(parse_double(a, t, 0.0, 1.0));
    } else if (a == "--ratio") {
      o.ratios.clear();
      o.ratios_given = true;
      for (const auto& r : split(value(i))) o.ratios.push_back(parse_double(a, r, 1.0001, 1e4));
    } else if (a == "--xkv-group") {
      o.xkv_groups.clear();
      for (const auto& g : split(value(i))) {
        o.xkv_groups.push_back(static_cast<int>(parse_int(a, g, 1, 1024)));
      }
    } else if (a == "--cskv-window") {
      o.base.cskv_window = parse_int(a, value(i), 0, 1 << 20);
    } else if (a == "--group") {
      o.base.group = static_cast<int>(parse_int(a, value(i), 1, 4096));
    } else if (a == "--residual") {
      o.base.residual = parse_int(a, value(i), 0, 1 << 30);
    } else if (a == "--lazy-recent") {
      o.lazy_recents.clear();
      for (const auto& r : split(value(i))) o.lazy_recents.push_back(parse_int(a, r, 1, 1 << 30));
    } else if (a == "--sinks") {
      o.base.sinks = parse_int(a, value(i), 0, 1 << 30);
    } else if (a == "--context") {
      o.settings.context = parse_int(a, value(i), 16, 1 << 20);
    } else if (a == "--continuation") {
      o.settings.continuation = parse_int(a, value(i), 2, 1 << 16);
    } else if (a == "--text") {
      o.text_file = value(i);
    } else if (a == "--tasks") {
      o.tasks_file = value(i);
    } else if (a == "--task-kind") {
      o.task_kind = value(i);
      if (o.task_kind != "passkey" && o.task_kind != "kv") {
        throw std::runtime_error("--task-kind: passkey or kv, not '" + o.task_kind + "'");
      }
    } else if (a == "--num-tasks") {
      o.num_tasks = static_cast<int>(parse_int(a, value(i), 1, 100000));
    } else if (a == "--seed") {
      o.seed = static_cast<uint32_t>(parse_int(a, value(i), 0, 4294967295.0));
    } else if (a == "--no-text") {
      o.settings.run_text = false;
    } else if (a == "--no-retrieval") {
      o.settings.run_retrieval = false;
    } else if (a == "--max-new-tokens") {
      o.settings.max_new_tokens = static_cast<int>(parse_int(a, value(i), 1, 4096));
    } else if (a == "--repeat-chunk") {
      o.settings.repeat_chunk = parse_int(a, value(i), 16, 1 << 20);
    } else if (a == "--json") {
      o.json_file = value(i);
    } else if (a == "--model") {
      o.model = value(i);
    } else if (a == "--threads") {
      o.threads = static_cast<int>(parse_int(a, value(i), 1, 1024));
    } else if (a == "--note") {
      o.note = value(i);
    } else if (a == "--head-scores") {
      o.settings.head_scores_file = value(i);
    } else if (a == "--verbose") {
      o.settings.verbose = true;
    } else if (a == "--quiet") {
      o.quiet = true;
    } else {
      throw std::runtime_error("unknown option '" + a + "' (see --help)");
    }
  }
  return o;
}

/// Every (policy, knob) row to run, the full cache first.
std::vector<PolicySpec> expand(const Options& o) {
  using kvpack::eval::RowKnob;
  std::vector<PolicySpec> rows;
  PolicySpec full = o.base;
  full.name = "full";
  rows.push_back(full);
  for (const auto& item : o.policies) {
    const RowBudget own = row_budget(item);
    if (own.name == "full") continue;
    const kvpack::eval::ResolvedPolicy policy = kvpack::eval::resolve_policy(own.name);
    const RowKnob knob = policy.entry->knob;
    // "lazy+quant4": bits written into the name override --bits for that row.
    std::string name = own.name;
    if (policy.bits != 0) name.resize(name.find("quant") + 5);
    const std::vector<int> bits_list = policy.bits != 0   ? std::vector<int>{policy.bits}
                                       : policy.quantized ? o.bits
                                                          : std::vector<int>{16};
    auto row = [&](int bits) {
      PolicySpec s = o.base;
      s.name = name;
      s.bits = policy.quantized ? bits : s.bits;
      return s;
    };
    if (knob == RowKnob::kRatio) {
      const auto ratios = std::isnan(own.ratio) ? o.ratios : std::vector<double>{own.ratio};
      const auto groups =
          policy.entry->needs.layer_groups ? o.xkv_groups : std::vector<int>{o.base.xkv_group};
      for (int group : groups) {
        for (double ratio : ratios) {
          for (int bits : bits_list) {
            PolicySpec s = row(bits);
            s.xkv_group = group;
            s.ratio = ratio;
            rows.push_back(s);
          }
        }
      }
      continue;
    }
    // Eviction rows: one per keep ratio, or per target bytes ratio when --ratio is given.
    const bool evicts = knob == RowKnob::kKeep;
    const bool lazy = knob == RowKnob::kThreshold;
    const bool by_ratio = !std::isnan(own.ratio) || (std::isnan(own.keep) && o.ratios_given);
    const std::vector<double> budgets = !evicts                  ? std::vector<double>{1.0}
                                        : !std::isnan(own.ratio) ? std::vector<double>{own.ratio}
                                        : !std::isnan(own.keep)  ? std::vector<double>{own.keep}
                                        : o.ratios_given         ? o.ratios
                                                                 : o.keeps;
    for (double budget : budgets) {
      for (double thr : lazy ? o.thresholds : std::vector<double>{0.0}) {
        for (int64_t recent : lazy ? o.lazy_recents : std::vector<int64_t>{o.base.lazy_recent}) {
          for (int bits : bits_list) {
            PolicySpec s = row(bits);
            if (evicts && by_ratio) {
              s.ratio = budget;
              s.keep_from_ratio = true;
            } else {
              s.keep = budget;
            }
            s.threshold = lazy ? thr : s.threshold;
            s.lazy_recent = recent;
            rows.push_back(s);
          }
        }
      }
    }
  }
  return rows;
}

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

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  std::ostringstream os;
  os << std::setprecision(6) << x;
  return os.str();
}

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

void print_table(const std::vector<PolicyResult>& rows, const kvpack::eval::Settings& s) {
  std::printf("\n%-26s %8s %9s %9s %9s %9s %9s %10s %10s %10s\n", "policy", "bytes_x", "agree@1",
              "agr_dec", "kl", "ppl", "retrieval", "prefill/s", "decode/s", "compress_s");
  for (const auto& r : rows) {
    const double ratio = s.run_text ? r.bytes_ratio : r.retrieval_bytes_ratio;
    const double retrieval = r.retrieval_asked > 0 ? r.retrieval_acc : NAN;
    std::printf("%-26s %s %s %s %s %s %s %s %s %s\n", r.label.c_str(), cell(ratio, 8, 2).c_str(),
                cell(s.run_text ? r.agreement_top1 : NAN, 9, 3).c_str(),
                cell(s.run_text ? r.agreement_decisive : NAN, 9, 3).c_str(),
                cell(s.run_text ? r.kl : NAN, 9, 4).c_str(),
                cell(s.run_text ? r.perplexity : NAN, 9, 2).c_str(), cell(retrieval, 9, 3).c_str(),
                cell(r.prefill_tokens_per_s(), 10, 1).c_str(),
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
      static_cast<long long>(s.continuation), static_cast<long long>(s.context),
      kvpack::eval::kDecisiveMargin);
}

/// One line that reads the table: the most compressed row that answers as many retrieval
/// questions as the full cache, and the row that answers fewest. Computed from the rows.
void print_reading(const std::vector<PolicyResult>& rows, const kvpack::eval::Settings& s) {
  if (rows.size() < 2) return;
  const PolicyResult& full = rows[0];
  const auto ratio = [&](const PolicyResult& r) {
    return s.run_text ? r.bytes_ratio : r.retrieval_bytes_ratio;
  };
  const auto answers = [](const PolicyResult& r) {
    return std::to_string(r.retrieval_correct) + "/" + std::to_string(r.retrieval_asked);
  };
  const auto quality = [&](const PolicyResult& r) {
    return s.run_text ? ", KL " + cell(r.kl, 0, 3) + " vs the full cache" : std::string();
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
                double gemm_flops_per_s = NAN) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
  out << "{\n  \"model\": \"" << json_escape(o.model)
      << "\",\n  \"threads\": " << omp_get_max_threads()
      << ",\n  \"gemm_flops_per_s\": " << json_number(gemm_flops_per_s)
      << ",\n  \"prefill_flops_per_s\": " << json_number(rows.at(0).prefill_flops_per_s())
      << ",\n  \"note\": \"" << json_escape(o.note) << "\",\n  \"context\": " << o.settings.context
      << ",\n  \"continuation\": " << o.settings.continuation
      << ",\n  \"num_tasks\": " << o.num_tasks << ",\n  \"task_kind\": \""
      << (o.tasks_file.empty() ? o.task_kind : "file:" + json_escape(o.tasks_file))
      << "\",\n  \"results\": [\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    out << "    {\"policy\": \"" << json_escape(r.label)
        << "\", \"bytes_ratio\": " << json_number(r.bytes_ratio)
        << ", \"retrieval_bytes_ratio\": " << json_number(r.retrieval_bytes_ratio)
        << ", \"agreement_top1\": " << json_number(o.settings.run_text ? r.agreement_top1 : NAN)
        << ", \"agreement_decisive\": "
        << json_number(o.settings.run_text ? r.agreement_decisive : NAN)
        << ", \"decisive_positions\": " << r.decisive_positions
        << ", \"kl\": " << json_number(o.settings.run_text ? r.kl : NAN)
        << ", \"perplexity\": " << json_number(o.settings.run_text ? r.perplexity : NAN)
        << ", \"retrieval_acc\": " << json_number(r.retrieval_asked > 0 ? r.retrieval_acc : NAN)
        << ", \"prefill_tokens_per_s\": " << json_number(r.prefill_tokens_per_s())
        << ", \"decode_tokens_per_s\": " << json_number(r.decode_tokens_per_s())
        << ", \"retrieval_asked\": " << r.retrieval_asked
        << ", \"score_seconds\": " << json_number(r.score_seconds)
        << ", \"compress_seconds\": " << json_number(r.compress_seconds);
    if (r.lazy_layers >= 0) {
      out << ", \"lazy_layers\": " << r.lazy_layers << ", \"layer_mass\": [";
      for (std::size_t c = 0; c < r.layer_mass.size(); ++c) {
        out << (c ? ", " : "") << "[";
        for (std::size_t l = 0; l < r.layer_mass[c].size(); ++l) {
          out << (l ? ", " : "") << json_number(r.layer_mass[c][l]);
        }
        out << "]";
      }
      out << "]";
    }
    out << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  out << "  ]\n}\n";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    if (o.threads > 0) omp_set_num_threads(o.threads);
    ProgressBar bar(!o.quiet);
    const auto file = kvpack::llama::GgufFile::open(o.model);
    const auto tokenizer = kvpack::llama::Tokenizer::from_gguf(file);
    const auto model = kvpack::llama::LlamaModel::from_gguf(file);
    kvpack::eval::Runner runner(model, tokenizer, o.settings);

    // What the rows' policies need from the driver besides their own rows.
    bool calibrate = false, head_level = false;
    for (const auto& p : o.policies) {
      const auto& needs = kvpack::eval::resolve_policy(row_budget(p).name).entry->needs;
      calibrate = calibrate || needs.projections;
      head_level = head_level || needs.head_scores;
    }
    std::vector<int32_t> text;
    if (o.settings.run_text || calibrate) {
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

    const auto specs = expand(o);
    std::vector<PolicyResult> rows(specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) rows[i].label = specs[i].label();
    std::string phase;
    auto progress = [&](const std::string& stage, double f) { bar.update(phase, stage, f); };
    if (o.settings.run_text) {
      phase = "text";
      runner.run_text(specs, text, rows, progress);
      bar.done();
      std::fprintf(stderr, "text done\n");
    }
    if (o.settings.run_retrieval) {
      phase = "retrieval";
      // Partial results survive an interrupted long run.
      auto save = [&] {
        if (!o.json_file.empty()) write_json(o.json_file, o, rows);
      };
      runner.run_retrieval(specs, tasks, rows, progress, save);
      bar.done();
      std::fprintf(stderr, "retrieval done\n");
    }
    print_table(rows, o.settings);
    print_reading(rows, o.settings);
    // Same-run baseline for the prefill rate: Eigen GEMM at the MLP shape of one prefill chunk.
    const double gemm =
        kvpack::eval::measure_gemm_flops_per_s(model.config(), model.chunk_size(), 2.0);
    std::printf(
        "prefill: %.1f GFLOP/s (matmuls + attention, %.0f tokens) = %.2f of this machine's fp32 "
        "GEMM, %.1f GFLOP/s at (%lld x %d)(%d x %d), %d threads, measured in this run\n",
        rows[0].prefill_flops_per_s() * 1e-9, rows[0].prefill_tokens,
        rows[0].prefill_flops_per_s() / gemm, gemm * 1e-9,
        static_cast<long long>(model.chunk_size()), model.config().hidden, model.config().hidden,
        model.config().ffn, omp_get_max_threads());
    if (!o.json_file.empty()) write_json(o.json_file, o, rows, gemm);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "kvpack-eval: " << e.what() << "\n";
    return 2;
  }
}
