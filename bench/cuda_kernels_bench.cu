// CUDA kernel benchmarks (built into kvpack_bench when the CUDA backend is enabled): every kernel
// timed with CUDA events on the stream it runs on and reported in bytes/s of global memory it must
// move, next to `fraction_of_copy`: that rate over a device-to-device cudaMemcpy measured by this
// process (bytes read + written per second). Streaming kernels target >= 0.8 of the copy.
// Shapes: 32 K tokens; SmolLM2-135M's group (kv_heads 3, q_heads 9, head_dim 64) and a
// Llama-3-8B layer's (kv_heads 8, q_heads 32, head_dim 128). Without a device every benchmark
// reports "no CUDA device" and is skipped.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/backend/cuda/kernels/kivi.cuh>
#include <kvpack/backend/cuda/kernels/observe.cuh>
#include <kvpack/backend/cuda/low_rank.hpp>
#include <kvpack/kvpack.hpp>
#include <random>
#include <vector>

namespace {

namespace kc = kvpack::cuda;
using kvpack::Half;

constexpr int64_t kTokens = 32 * 1024;

bool have_device() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

/// Marks the benchmark skipped (and returns true) on a machine without a CUDA device.
bool skipped_without_device(benchmark::State& state) {
  if (have_device()) return false;
  state.SkipWithError("no CUDA device");
  return true;
}

/// Device-to-device copy rate of this process: 256 MiB, read + written, best of 10.
double copy_bytes_per_second() {
  static const double rate = [] {
    const std::size_t bytes = std::size_t{256} << 20;
    kc::DeviceBuffer<unsigned char> a(bytes, 0), b(bytes, 0);
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    float best_ms = 1e30f;
    for (int i = 0; i < 11; ++i) {
      cudaEventRecord(start, nullptr);
      cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, nullptr);
      cudaEventRecord(stop, nullptr);
      cudaEventSynchronize(stop);
      float ms = 0;
      cudaEventElapsedTime(&ms, start, stop);
      if (i > 0 && ms < best_ms) best_ms = ms;  // the first copy warms up
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return 2.0 * static_cast<double>(bytes) / (best_ms * 1e-3);
  }();
  return rate;
}

template <class T>
kc::DeviceBuffer<T> upload(const std::vector<T>& host) {
  kc::DeviceBuffer<T> buffer(host.size(), 0);
  cudaMemcpy(buffer.data(), host.data(), buffer.bytes(), cudaMemcpyHostToDevice);
  return buffer;
}

std::vector<Half> random_half(std::size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<Half> x(n);
  for (auto& e : x) e = kvpack::to_half(gauss(rng));
  return x;
}

/// Runs `body` (work enqueued on `stream`, the legacy default stream unless given) once per
/// iteration between two CUDA events recorded on that stream and reports the event time,
/// bytes_per_second (`bytes` moved per iteration over that time) and fraction_of_copy (that rate
/// over copy_bytes_per_second()). Returns the seconds measured.
template <class Body>
double measure(benchmark::State& state, double bytes, Body body, cudaStream_t stream = nullptr) {
  if (skipped_without_device(state)) return 0;
  copy_bytes_per_second();  // measured before, not inside, the timed loop
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  body();
  cudaDeviceSynchronize();
  double total = 0;
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    body();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms * 1e-3);
    total += ms * 1e-3;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (state.iterations() == 0 || total <= 0) return 0;
  const double rate = bytes * static_cast<double>(state.iterations()) / total;
  state.counters["bytes_per_second"] = rate;
  state.counters["fraction_of_copy"] = rate / copy_bytes_per_second();
  return total;
}

// ---- baseline ---------------------------------------------------------------------------------

void BM_cuda_device_copy(benchmark::State& state) {
  const std::size_t bytes = std::size_t{256} << 20;
  if (skipped_without_device(state)) return;
  kc::DeviceBuffer<unsigned char> a(bytes, 0), b(bytes, 0);
  measure(state, 2.0 * bytes,
          [&] { cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, nullptr); });
}
BENCHMARK(BM_cuda_device_copy)->UseManualTime()->Unit(benchmark::kMicrosecond);

// ---- decode attention at 32 K tokens ----------------------------------------------------------

/// One decode token's attention over kv_heads heads of kTokens rows: Head = dense or KIVI.
struct DecodeSetup {
  int q_heads, kv_heads;
  kc::DeviceBuffer<float> q, acc, mx, sum, out;
  kc::DeviceBuffer<int32_t> q_positions, positions;
  kc::AttentionParams params{};

  DecodeSetup(int qh, int kvh, int d, int sm_count)
      : q_heads(qh),
        kv_heads(kvh),
        q(static_cast<std::size_t>(qh) * d, 0),
        out(static_cast<std::size_t>(qh) * d, 0),
        q_positions(1, 0),
        positions(kTokens, 0) {
    std::vector<int32_t> pos(kTokens);
    for (int64_t t = 0; t < kTokens; ++t) pos[t] = static_cast<int32_t>(t);
    cudaMemcpy(positions.data(), pos.data(), positions.bytes(), cudaMemcpyHostToDevice);
    const int32_t last = static_cast<int32_t>(kTokens - 1);
    cudaMemcpy(q_positions.data(), &last, sizeof(last), cudaMemcpyHostToDevice);
    std::vector<float> hq(q.size(), 0.1f);
    cudaMemcpy(q.data(), hq.data(), q.bytes(), cudaMemcpyHostToDevice);
    const int group = qh / kvh;
    const int64_t splits = kc::attention_launch_splits(1, group, kvh, kTokens, sm_count);
    acc = kc::DeviceBuffer<float>(static_cast<std::size_t>(splits * qh * d), 0);
    mx = kc::DeviceBuffer<float>(static_cast<std::size_t>(splits * qh), 0);
    sum = kc::DeviceBuffer<float>(static_cast<std::size_t>(splits * qh), 0);
    params.q = q.data();
    params.q_positions = q_positions.data();
    params.tokens = 1;
    params.q_heads = qh;
    params.group = group;
    params.scale = 1.0f / std::sqrt(static_cast<float>(d));
    params.splits = splits;
    params.partial_acc = acc.data();
    params.partial_max = mx.data();
    params.partial_sum = sum.data();
  }
};

int sm_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count;
}

template <int D>
void BM_cuda_dense_decode_attention(benchmark::State& state) {
  if (skipped_without_device(state)) return;
  const int q_heads = static_cast<int>(state.range(0)), kv_heads = static_cast<int>(state.range(1));
  DecodeSetup setup(q_heads, kv_heads, D, sm_count());
  std::vector<kc::DeviceBuffer<Half>> k, v;
  std::vector<kc::AttentionHead<Half>> heads;
  for (int h = 0; h < kv_heads; ++h) {
    k.push_back(upload(random_half(kTokens * D, 2 * h)));
    v.push_back(upload(random_half(kTokens * D, 2 * h + 1)));
    heads.push_back({k.back().data(), v.back().data(), setup.positions.data(), kTokens});
  }
  auto d_heads = upload(heads);
  const double bytes = 2.0 * kv_heads * kTokens * D * sizeof(Half);
  measure(state, bytes, [&] {
    kc::launch_attention<Half, D>(d_heads.data(), kv_heads, setup.params, setup.out.data(),
                                  q_heads * D, D, nullptr);
  });
}
BENCHMARK_TEMPLATE(BM_cuda_dense_decode_attention, 64)
    ->Args({9, 3})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_cuda_dense_decode_attention, 128)
    ->Args({32, 8})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

/// KIVI 4-bit, group 32, residual 128 fp16 tokens: the bytes are the blocks and the residual.
template <int D>
void BM_cuda_kivi_decode_attention(benchmark::State& state) {
  constexpr int kBits = 4, kGroup = 32;
  using Block = kvpack::QuantBlock<kBits, kGroup>;
  if (skipped_without_device(state)) return;
  const int q_heads = static_cast<int>(state.range(0)), kv_heads = static_cast<int>(state.range(1));
  const int64_t residual = 128, quantized = kTokens - residual;
  DecodeSetup setup(q_heads, kv_heads, D, sm_count());
  std::vector<kc::DeviceBuffer<Half>> rows, k_residual, v_residual;
  std::vector<kc::DeviceBuffer<Block>> k_blocks, v_blocks;
  std::vector<kc::KiviAttentionHead> heads;
  const kc::KiviFormat format = kc::KiviFormat::of(kBits, kGroup);
  for (int h = 0; h < kv_heads; ++h) {
    rows.push_back(upload(random_half(quantized * D, 7 * h)));
    k_blocks.emplace_back(static_cast<std::size_t>(quantized / kGroup * D), 0);
    v_blocks.emplace_back(static_cast<std::size_t>(quantized * (D / kGroup)), 0);
    kc::launch_quantize_rows<kBits, kGroup, Half>(rows.back().data(), rows.back().data(),
                                                  quantized / kGroup, D, k_blocks.back().data(),
                                                  v_blocks.back().data(), nullptr);
    k_residual.push_back(upload(random_half(residual * D, 7 * h + 1)));
    v_residual.push_back(upload(random_half(residual * D, 7 * h + 2)));
    heads.push_back({reinterpret_cast<const uint8_t*>(k_blocks.back().data()),
                     reinterpret_cast<const uint8_t*>(v_blocks.back().data()),
                     k_residual.back().data(), v_residual.back().data(), setup.positions.data(),
                     kTokens, quantized, format});
  }
  rows.clear();
  auto d_heads = upload(heads);
  const double bytes = kv_heads * (static_cast<double>(k_blocks[0].bytes() + v_blocks[0].bytes()) +
                                   2.0 * residual * D * sizeof(Half));
  measure(state, bytes, [&] {
    kc::launch_attention_heads<D>(d_heads.data(), kv_heads, setup.params, setup.out.data(),
                                  q_heads * D, D, nullptr);
  });
}
BENCHMARK_TEMPLATE(BM_cuda_kivi_decode_attention, 64)
    ->Args({9, 3})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_cuda_kivi_decode_attention, 128)
    ->Args({32, 8})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// ---- KIVI quantize, scoring, selection, compaction --------------------------------------------

/// Quantizes kTokens fp16 K and V rows of one head into 4-bit key and value blocks: bytes read
/// + written.
void BM_cuda_kivi_quantize(benchmark::State& state) {
  constexpr int kBits = 4, kGroup = 32;
  using Block = kvpack::QuantBlock<kBits, kGroup>;
  const int d = static_cast<int>(state.range(0));
  if (skipped_without_device(state)) return;
  auto k_rows = upload(random_half(kTokens * d, 3));
  auto v_rows = upload(random_half(kTokens * d, 4));
  kc::DeviceBuffer<Block> keys(kTokens / kGroup * d, 0), values(kTokens * (d / kGroup), 0);
  const double bytes =
      static_cast<double>(k_rows.bytes() + v_rows.bytes() + keys.bytes() + values.bytes());
  measure(state, bytes, [&] {
    kc::launch_quantize_rows<kBits, kGroup, Half>(k_rows.data(), v_rows.data(), kTokens / kGroup, d,
                                                  keys.data(), values.data(), nullptr);
  });
}
BENCHMARK(BM_cuda_kivi_quantize)->Arg(64)->Arg(128)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// L2NormEvict scores of 8 heads x kTokens fp16 keys: keys read + scores written.
void BM_cuda_score_l2(benchmark::State& state) {
  const int d = 128, heads = 8;
  if (skipped_without_device(state)) return;
  auto k = upload(random_half(heads * kTokens * d, 4));
  kc::DeviceBuffer<float> scores(heads * kTokens, 0);
  std::vector<kc::ScoreJob<Half>> jobs;
  for (int h = 0; h < heads; ++h) {
    jobs.push_back({k.data() + h * kTokens * d, k.data() + h * kTokens * d, nullptr, kTokens - 1,
                    kTokens, h * kTokens});
  }
  auto d_jobs = upload(jobs);
  const double bytes = static_cast<double>(k.bytes() + scores.bytes());
  measure(state, bytes, [&] {
    kc::launch_score_tokens<kvpack::L2NormEvict, Half>(d_jobs.data(), heads, kTokens, d,
                                                       scores.data(), nullptr);
  });
}
BENCHMARK(BM_cuda_score_l2)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// KVzip observe(): a repeat-pass chunk of 32 query tokens scoring kTokens fp16 keys per kv head
/// (pass 1, attention over the keys and values; pass 2, the keys again). Reports bytes_per_second
/// over the keys and values read once and flops_per_second over the 2 · D flops per (key, row) of
/// pass 1's logits, its P · V and pass 2's logits (the queries sit at the end of the context, so
/// every row sees nearly every key).
template <int D>
void BM_cuda_kvzip_observe(benchmark::State& state) {
  if (skipped_without_device(state)) return;
  const int q_heads = static_cast<int>(state.range(0)), kv_heads = static_cast<int>(state.range(1));
  const int64_t tokens = 32;
  std::vector<int32_t> hp(kTokens), hq(tokens);
  for (int64_t t = 0; t < kTokens; ++t) hp[t] = static_cast<int32_t>(t);
  for (int64_t t = 0; t < tokens; ++t) hq[t] = static_cast<int32_t>(kTokens - tokens + t);
  auto positions = upload(hp);
  auto q_positions = upload(hq);
  std::vector<kc::DeviceBuffer<Half>> keys, values;
  std::vector<kc::DeviceBuffer<float>> scores;
  std::vector<kc::ObserveHead<Half>> heads;
  for (int h = 0; h < kv_heads; ++h) {
    keys.push_back(upload(random_half(kTokens * D, 20 + h)));
    values.push_back(upload(random_half(kTokens * D, 40 + h)));
    scores.push_back(upload(std::vector<float>(kTokens, kc::kUnscoredScore)));
    heads.push_back({keys.back().data(), values.back().data(), positions.data(),
                     scores.back().data(), kTokens});
  }
  auto d_heads = upload(heads);
  std::vector<float> hq_rows(tokens * q_heads * D);
  std::mt19937 rng(21);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (auto& x : hq_rows) x = gauss(rng);
  auto q = upload(hq_rows);
  const int64_t rows = tokens * q_heads;
  const int64_t splits =
      kc::attention_launch_splits(tokens, q_heads / kv_heads, kv_heads, kTokens, sm_count());
  kc::DeviceBuffer<float> row_max(rows, 0), row_sum(rows, 0), attended(rows * D, 0);
  kc::DeviceBuffer<float> partial_acc(splits * rows * D, 0), partial_max(splits * rows, 0),
      partial_sum(splits * rows, 0);
  kc::ObserveParams p{};
  p.q = q.data();
  p.q_positions = q_positions.data();
  p.tokens = tokens;
  p.q_heads = q_heads;
  p.group = q_heads / kv_heads;
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  p.row_max = row_max.data();
  p.row_sum = row_sum.data();
  p.splits = splits;
  p.partial_acc = partial_acc.data();
  p.partial_max = partial_max.data();
  p.partial_sum = partial_sum.data();
  p.attended = attended.data();
  p.attended_token_stride = int64_t{q_heads} * D;
  p.attended_head_stride = D;
  const double kv_bytes = 2.0 * kv_heads * kTokens * D * sizeof(Half);
  const double seconds = measure(state, kv_bytes, [&] {
    kc::launch_observe<D, Half, false>(d_heads.data(), kv_heads, kTokens, p, nullptr);
  });
  if (seconds > 0) {
    const double flops = 3.0 * 2.0 * D * static_cast<double>(kTokens) * tokens * q_heads;
    state.counters["flops_per_second"] = flops * static_cast<double>(state.iterations()) / seconds;
  }
}
BENCHMARK_TEMPLATE(BM_cuda_kvzip_observe, 64)
    ->Args({9, 3})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_cuda_kvzip_observe, 128)
    ->Args({32, 8})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

/// KVCacheBatch decode: 16 sequences of 4,096 tokens (one layer), one decode token each, q and
/// out on the device, device value checks off: one batch call (range(2) = 0: one attention
/// launch) against one attend() per sequence (1), timed by events on the batch's stream (the
/// host side of the calls shows only where it leaves the device idle). bytes_per_second over
/// the K/V rows read.
template <int D>
void BM_cuda_batch_decode(benchmark::State& state) {
  if (skipped_without_device(state)) return;
  const int q_heads = static_cast<int>(state.range(0)), kv_heads = static_cast<int>(state.range(1));
  const bool separate = state.range(2) != 0;
  const int sequences = 16;
  const int64_t tokens = 4096;
  const kvpack::ModelShape shape{1, q_heads, kv_heads, D, {}};
  kc::CudaContext context(0);
  context.set_device_value_checks(false);
  kvpack::KVCacheBatch<kvpack::Identity, kvpack::backend::Cuda> batch(shape, kvpack::Identity{},
                                                                      context);
  std::vector<int64_t> positions(tokens);
  for (int64_t t = 0; t < tokens; ++t) positions[t] = t;
  std::vector<float> rows(static_cast<std::size_t>(tokens) * kv_heads * D);
  std::mt19937 rng(31);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (auto& x : rows) x = gauss(rng);
  const auto view = kvpack::ActivationView::nhd(rows.data(), tokens, kv_heads, D);
  for (int s = 0; s < sequences; ++s) batch.add(s).append(0, view, view, positions);
  const std::size_t row = static_cast<std::size_t>(q_heads) * D;
  std::vector<float> hq(sequences * row);
  for (auto& x : hq) x = gauss(rng);
  auto q = upload(hq);
  kc::DeviceBuffer<float> out(hq.size(), 0);
  const std::vector<int64_t> q_position{tokens - 1};
  std::vector<kvpack::BatchQuery> entries;
  for (int s = 0; s < sequences; ++s) {
    entries.push_back({s, kvpack::ActivationView::nhd(q.data() + s * row, 1, q_heads, D),
                       q_position, kvpack::OutputView::nhd(out.data() + s * row, 1, q_heads, D)});
  }
  const double kv_bytes = 2.0 * sequences * tokens * kv_heads * D * sizeof(Half);
  measure(
      state, kv_bytes,
      [&] {
        if (separate) {
          for (const auto& e : entries) {
            batch.sequence(e.sequence)
                .attend(0, e.q, e.positions, e.out, kvpack::MemorySpace::kDevice);
          }
        } else {
          batch.attend(0, entries, kvpack::MemorySpace::kDevice);
        }
      },
      context.stream());
}
BENCHMARK_TEMPLATE(BM_cuda_batch_decode, 64)
    ->Args({9, 3, 0})
    ->Args({9, 3, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_cuda_batch_decode, 128)
    ->Args({32, 8, 0})
    ->Args({32, 8, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

/// Top-k selection (keep half) over 8 heads x kTokens scores: scores and positions read, flags
/// and kept indices written.
void BM_cuda_select_top_k(benchmark::State& state) {
  const int heads = 8;
  if (skipped_without_device(state)) return;
  std::mt19937 rng(5);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> hs(heads * kTokens);
  for (auto& x : hs) x = gauss(rng);
  std::vector<int32_t> hp(heads * kTokens);
  for (std::size_t i = 0; i < hp.size(); ++i) hp[i] = static_cast<int32_t>(i % kTokens);
  auto scores = upload(hs);
  auto positions = upload(hp);
  std::vector<kc::SelectJob> jobs;
  for (int h = 0; h < heads; ++h) {
    jobs.push_back({scores.data() + h * kTokens, positions.data() + h * kTokens, kTokens,
                    kTokens / 2, 0, kTokens, h * kTokens});
  }
  auto d_jobs = upload(jobs);
  kc::DeviceBuffer<uint8_t> flags(heads * kTokens, 0);
  kc::DeviceBuffer<int32_t> index(heads * kTokens, 0);
  kc::DeviceBuffer<kc::SelectResult> results(heads, 0);
  const double bytes =
      static_cast<double>(scores.bytes() + positions.bytes() + flags.bytes() + index.bytes() / 2);
  measure(state, bytes, [&] {
    kc::launch_select_top_k(d_jobs.data(), heads, flags.data(), results.data(), index.data(),
                            nullptr);
  });
}
BENCHMARK(BM_cuda_select_top_k)->UseManualTime()->Unit(benchmark::kMicrosecond);

/// Compaction of 8 heads x kTokens fp16 rows (d 128) keeping every other row: kept rows and
/// positions read and written.
void BM_cuda_gather_rows(benchmark::State& state) {
  const int d = 128, heads = 8;
  const int64_t kept = kTokens / 2;
  if (skipped_without_device(state)) return;
  auto k = upload(random_half(heads * kTokens * d, 6));
  auto v = upload(random_half(heads * kTokens * d, 7));
  std::vector<int32_t> hp(kTokens), hi(kept);
  for (int64_t t = 0; t < kTokens; ++t) hp[t] = static_cast<int32_t>(t);
  for (int64_t j = 0; j < kept; ++j) hi[j] = static_cast<int32_t>(2 * j);
  auto positions = upload(hp);
  auto index = upload(hi);
  kc::DeviceBuffer<Half> nk(heads * kept * d, 0), nv(heads * kept * d, 0);
  kc::DeviceBuffer<int32_t> np(heads * kept, 0);
  std::vector<kc::CompactJob<Half>> jobs;
  for (int h = 0; h < heads; ++h) {
    jobs.push_back({k.data() + h * kTokens * d, v.data() + h * kTokens * d, positions.data(),
                    index.data(), kept, nk.data() + h * kept * d, nv.data() + h * kept * d,
                    np.data() + h * kept});
  }
  auto d_jobs = upload(jobs);
  const double bytes =
      2.0 * (2.0 * heads * kept * d * sizeof(Half) + heads * kept * 4.0) + heads * kept * 4.0;
  measure(state, bytes, [&] { kc::launch_gather_rows(d_jobs.data(), heads, kept, d, nullptr); });
}
BENCHMARK(BM_cuda_gather_rows)->UseManualTime()->Unit(benchmark::kMicrosecond);

// ---- xKV factorisation ------------------------------------------------------------------------

/// gram_factorize of one xKV group: tokens x (4 layers * kv_heads * head_dim) fp32, rank r.
/// Reports flops_per_second (2 tokens cols^2 for the Gram matrix + 2 tokens cols r for the
/// factors; the eigen-decomposition's O(cols^3) is not counted) besides the bytes of X read.
void BM_cuda_xkv_factorize(benchmark::State& state) {
  if (skipped_without_device(state)) return;
  const int rows = static_cast<int>(state.range(0)), cols = static_cast<int>(state.range(1));
  const int rank = static_cast<int>(state.range(2));
  kc::CudaContext context(0);
  std::vector<float> hx(static_cast<std::size_t>(rows) * cols);
  std::mt19937 rng(9);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (auto& e : hx) e = gauss(rng);
  auto x = upload(hx);
  kc::DeviceBuffer<float> basis(static_cast<std::size_t>(rank) * cols, 0),
      factors(static_cast<std::size_t>(rows) * rank, 0);
  std::vector<float> singular;
  const double seconds = measure(state, 2.0 * x.bytes(), [&] {
    kc::gram_factorize(context, x.data(), rows, cols, rank, basis.data(), factors.data(), singular);
  });
  if (seconds > 0) {
    const double flops = 2.0 * rows * cols * (static_cast<double>(cols) + rank);
    state.counters["flops_per_second"] = flops * static_cast<double>(state.iterations()) / seconds;
  }
}
// SmolLM2-135M group: 4 x 3 x 64 = 768 columns; a Llama-3-8B group: 4 x 8 x 128 = 4096.
BENCHMARK(BM_cuda_xkv_factorize)
    ->Args({4096, 768, 128})
    ->Args({8192, 4096, 512})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
