// kvpack-generate: loads the reference model and greedily continues a prompt through a kvpack
// cache, printing timings. Also measures prefill speed on a synthetic prompt (--bench-prefill).

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <kvpack/kvpack.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif
#include <string>
#include <vector>

#include "attention_cache.hpp"
#include "inference.hpp"
#include "model.hpp"
#include "model_path.hpp"
#include "tokenizer.hpp"

namespace {

using kvpack::llama::AttentionCache;
using kvpack::llama::LlamaModel;
using kvpack::llama::Tokenizer;

void usage() {
  std::cerr
      << "usage: kvpack-generate [options] PROMPT\n"
         "  --model PATH         GGUF file (default: $KVPACK_MODEL or the kvpack cache)\n"
         "  --chat               wrap PROMPT in the chat template as a user message\n"
         "  --max-tokens N       tokens to generate (default 64)\n"
         "  --cache KIND         identity (fp16, default), identity-f32, dense (reference)\n"
         "  --chunk N            prefill chunk size (default 256)\n"
         "  --threads N          OpenMP threads (default: OMP_NUM_THREADS or all cores)\n"
         "  --bench-prefill N    time the prefill of N synthetic tokens, then 32 decode steps\n";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Options {
  std::string model = kvpack::llama::reference_model_path();
  std::string prompt;
  std::string cache = "identity";
  bool chat = false;
  int max_tokens = 64;
  int64_t chunk = 256;
  int64_t bench_prefill = 0;
  int threads = 0;
};

// Runs `body` with an AttentionCache of the requested kind.
template <class Body>
void with_cache(const Options& o, const LlamaModel& model, Body&& body) {
  if (o.cache == "dense") {
    auto cache = model.make_dense_cache();
    body(static_cast<AttentionCache&>(cache));
  } else if (o.cache == "identity-f32") {
    kvpack::KVCache<kvpack::IdentityF32> cache(model.config().shape());
    kvpack::llama::KvCacheAdapter<decltype(cache)> adapter(cache, false);
    body(static_cast<AttentionCache&>(adapter));
    std::cerr << "cache: " << cache.bytes() << " bytes held, " << cache.dense_bytes()
              << " dense fp16 bytes\n";
  } else if (o.cache == "identity") {
    kvpack::KVCache<kvpack::Identity> cache(model.config().shape());
    kvpack::llama::KvCacheAdapter<decltype(cache)> adapter(cache, false);
    body(static_cast<AttentionCache&>(adapter));
    std::cerr << "cache: " << cache.bytes() << " bytes held, " << cache.dense_bytes()
              << " dense fp16 bytes\n";
  } else {
    throw std::invalid_argument("unknown --cache '" + o.cache + "'");
  }
}

void bench_prefill(const Options& o, const LlamaModel& model, const Tokenizer& tokenizer) {
  const std::string paragraph =
      "The river ran slowly past the old mill, and the miller's daughter counted the boats that "
      "went down to the sea. Some carried grain, some carried wool, and one, every spring, "
      "carried a fiddler who played for anyone who would listen. ";
  const std::vector<int32_t> unit = tokenizer.encode(paragraph);
  std::vector<int32_t> tokens;
  while (static_cast<int64_t>(tokens.size()) < o.bench_prefill) {
    tokens.insert(tokens.end(), unit.begin(), unit.end());
  }
  tokens.resize(o.bench_prefill);
  with_cache(o, model, [&](AttentionCache& cache) {
    const auto result = kvpack::llama::greedy_generate(model, cache, tokens, 0, 33);
    std::cout << "prefill " << tokens.size() << " tokens: " << result.prefill_seconds << " s ("
              << tokens.size() / result.prefill_seconds << " tokens/s); decode "
              << result.tokens.size() - 1
              << " tokens: " << (result.tokens.size() - 1) / result.decode_seconds << " tokens/s\n";
  });
}

}  // namespace

int main(int argc, char** argv) {
#if defined(KVPACK_TOOLS_UNOPTIMIZED)
  std::fprintf(
      stderr,
      "kvpack-generate: built with KVPACK_TOOLS_OPTIMIZE=OFF (-O0, a compile check): slow, "
      "timings mean nothing; rebuild with -DKVPACK_TOOLS_OPTIMIZE=ON\n");
#endif
  Options o;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
        return argv[++i];
      };
      if (a == "--model") {
        o.model = value();
      } else if (a == "--chat") {
        o.chat = true;
      } else if (a == "--max-tokens") {
        o.max_tokens = std::stoi(value());
      } else if (a == "--cache") {
        o.cache = value();
      } else if (a == "--chunk") {
        o.chunk = std::stoll(value());
      } else if (a == "--threads") {
        o.threads = std::stoi(value());
      } else if (a == "--bench-prefill") {
        o.bench_prefill = std::stoll(value());
      } else if (a == "-h" || a == "--help") {
        usage();
        return 0;
      } else if (!a.empty() && a[0] == '-') {
        throw std::invalid_argument("unknown option " + a);
      } else {
        o.prompt = a;
      }
    }
    if (o.prompt.empty() && o.bench_prefill <= 0) {
      usage();
      return 2;
    }

#if defined(_OPENMP)
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
    auto t0 = std::chrono::steady_clock::now();
    const auto file = kvpack::llama::GgufFile::open(o.model);
    const Tokenizer tokenizer = Tokenizer::from_gguf(file);
    LlamaModel model = LlamaModel::from_gguf(file);
    model.set_chunk_size(o.chunk);
    std::cerr << "loaded " << o.model << " in " << seconds_since(t0) << " s\n";

    if (o.bench_prefill > 0) {
      bench_prefill(o, model, tokenizer);
      return 0;
    }
    const std::string text =
        o.chat ? kvpack::llama::apply_chat_template({{"user", o.prompt}}) : o.prompt;
    const std::vector<int32_t> prompt = tokenizer.encode(text, /*parse_special=*/true);
    std::vector<int32_t> stop = {tokenizer.eos_id()};
    if (const int32_t im_end = tokenizer.find_piece("<|im_end|>"); im_end >= 0) {
      stop.push_back(im_end);
    }
    with_cache(o, model, [&](AttentionCache& cache) {
      const auto result =
          kvpack::llama::greedy_generate(model, cache, prompt, 0, o.max_tokens, stop);
      std::cout << text << tokenizer.decode(result.tokens) << "\n";
      std::cerr << "prompt " << prompt.size() << " tokens in " << result.prefill_seconds
                << " s; generated " << result.tokens.size() << " tokens";
      if (result.tokens.size() > 1) {
        std::cerr << ", " << (result.tokens.size() - 1) / result.decode_seconds
                  << " tokens/s decode";
      }
      std::cerr << "\n";
    });
  } catch (const std::exception& e) {
    std::cerr << "kvpack-generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
