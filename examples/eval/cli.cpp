// kvpack-eval's command line (see cli.hpp).
#include "cli.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvpack {
namespace eval {
namespace {

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
    "  --int8-query         quant rows score keys from an int8 query (Quantize::int8_query)\n"
    "  --threshold LIST     LazyLayerDrop thresholds (default 0.9, from the mass measured on\n"
    "                       SmolLM2, docs/evaluation.md); kvzap-threshold: log-scores\n"
    "  --lazy-recent LIST   recent windows in tokens of LazyLayerDrop and kvzap-threshold\n"
    "                       (default 1024)\n"
    "  --sinks N            protected first tokens (default: the system prompt, or 4)\n"
    "  --xkv-group LIST     CrossLayerSVD layers per group (default 4)\n"
    "  --cskv-residual N    ChannelShrink exact residual (default 32); its projections are\n"
    "                       calibrated on the last 1024 tokens of the text\n"
    "Inputs:\n"
    "  --context N          context tokens compressed before scoring (default 2048)\n"
    "  --continuation N     teacher-forced tokens for agreement/KL/perplexity (default 128)\n"
    "  --decode-tokens N    decoding test: N tokens after the text's context (its next token,\n"
    "                       then N - 1 the full cache generates); every row is fed them and\n"
    "                       compresses while it decodes (default 0: off)\n"
    "  --compress-every N   decoding test: compress() after every N tokens (default 32)\n"
    "  --decode-temperature T  decoding test: the full cache samples at T, seeded by --seed\n"
    "                       (default 1; 0: greedy)\n"
    "  --text FILE          long text for agreement/KL/perplexity (default: Debian's license\n"
    "                       texts in /usr/share/common-licenses)\n"
    "  --tasks FILE         JSONL retrieval tasks {\"context\",\"question\",\"answer\"[,\n"
    "                       \"answer_prefix\"]} (default: generated passkey tasks)\n"
    "  --task-kind KIND     generated tasks: passkey (default) or kv\n"
    "  --num-tasks N        generated tasks (default 10)\n"
    "  --seed N             seed of the generated tasks and the decoding test (default 1)\n"
    "  --no-text            skip agreement/KL/perplexity\n"
    "  --no-retrieval       skip retrieval\n"
    "  --max-new-tokens N   greedy tokens per answer (default 10)\n"
    "  --repeat-chunk N     KVzip repeat chunk in tokens (default 2000)\n"
    "  --head-scores FILE   kvzip-head: load head scores from FILE, or score one sample (a\n"
    "                       passkey context of --context tokens, seed + 1000003, not one of\n"
    "                       the evaluated inputs) and write them there\n"
    "  --kvzap-scorer FILE  kvzap: load the fitted scorer from FILE, or fit one (KVzip+ repeat\n"
    "                       passes over the license texts but GPL-3, the text run's, in\n"
    "                       --context chunks; LGPL-3 held out) and write it there\n"
    "  --kvzap-target NAME  what a fitted scorer predicts: kvzip-plus (the paper's, default)\n"
    "                       or kvzip\n"
    "Output and machine:\n"
    "  --json FILE          also write the results as JSON\n"
    "  --model PATH         GGUF model (default: $KVPACK_MODEL or the kvpack cache)\n"
    "  --threads N          threads of the model (OpenMP) and of kvpack's pool (default: all\n"
    "                       cores)\n"
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

}  // namespace

Options parse_options(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::runtime_error(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << kHelp << "\nPolicy names (--policy):\n";
      for (const auto& e : policy_registry()) {
        std::printf("  %-19s  %s%s\n", e.name.c_str(), e.help.c_str(),
                    e.composes ? " [+quant]" : "");
      }
      std::exit(0);
    } else if (a == "--policy") {
      o.policies = split(value(i));
      for (const auto& written : o.policies) {
        // Checks the budget suffix, the name and any bits written into it.
        resolve_policy(row_budget(written).name);
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
      for (const auto& t : split(value(i))) o.thresholds.push_back(parse_double(a, t, -87.0, 88.0));
    } else if (a == "--ratio") {
      o.ratios.clear();
      o.ratios_given = true;
      for (const auto& r : split(value(i))) o.ratios.push_back(parse_double(a, r, 1.0001, 1e4));
    } else if (a == "--xkv-group") {
      o.xkv_groups.clear();
      for (const auto& g : split(value(i))) {
        o.xkv_groups.push_back(static_cast<int>(parse_int(a, g, 1, 1024)));
      }
    } else if (a == "--cskv-residual") {
      o.base.cskv_residual = parse_int(a, value(i), 0, 1 << 20);
    } else if (a == "--group") {
      o.base.group = static_cast<int>(parse_int(a, value(i), 1, 4096));
    } else if (a == "--residual") {
      o.base.residual = parse_int(a, value(i), 0, 1 << 30);
    } else if (a == "--int8-query") {
      o.base.int8_query = true;
    } else if (a == "--lazy-recent") {
      o.lazy_recents.clear();
      for (const auto& r : split(value(i))) o.lazy_recents.push_back(parse_int(a, r, 1, 1 << 30));
    } else if (a == "--sinks") {
      o.base.sinks = parse_int(a, value(i), 0, 1 << 30);
    } else if (a == "--context") {
      o.settings.context = parse_int(a, value(i), 16, 1 << 20);
    } else if (a == "--continuation") {
      o.settings.continuation = parse_int(a, value(i), 2, 1 << 16);
    } else if (a == "--decode-tokens") {
      o.settings.decode_tokens = parse_int(a, value(i), 0, 1 << 16);
      if (o.settings.decode_tokens == 1) {
        throw std::runtime_error("--decode-tokens: 0 (off) or at least 2, not 1");
      }
    } else if (a == "--compress-every") {
      o.settings.compress_every = parse_int(a, value(i), 1, 1 << 16);
    } else if (a == "--decode-temperature") {
      o.settings.decode_temperature = parse_double(a, value(i), 0.0, 100.0);
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
      o.settings.decode_seed = o.seed;
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
    } else if (a == "--kvzap-scorer") {
      o.settings.kvzap_scorer_file = value(i);
    } else if (a == "--kvzap-target") {
      o.settings.kvzap_target = value(i);
      if (o.settings.kvzap_target != "kvzip" && o.settings.kvzap_target != "kvzip-plus") {
        throw std::runtime_error("--kvzap-target: expected kvzip or kvzip-plus, got '" +
                                 o.settings.kvzap_target + "'");
      }
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

std::vector<PolicySpec> expand_rows(const Options& o) {
  std::vector<PolicySpec> rows;
  PolicySpec full = o.base;
  full.name = "full";
  rows.push_back(full);
  for (const auto& item : o.policies) {
    const RowBudget own = row_budget(item);
    if (own.name == "full") continue;
    const ResolvedPolicy policy = resolve_policy(own.name);
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

DriverNeeds driver_needs(const Options& o) {
  DriverNeeds needs;
  for (const auto& p : o.policies) {
    const DriverNeeds& row = resolve_policy(row_budget(p).name).entry->needs;
    needs.projections = needs.projections || row.projections;
    needs.head_scores = needs.head_scores || row.head_scores;
    needs.hidden_scorer = needs.hidden_scorer || row.hidden_scorer;
  }
  return needs;
}

}  // namespace eval
}  // namespace kvpack
