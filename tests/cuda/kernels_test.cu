// The CUDA kernels launched directly, against the CPU functions they must reproduce: selection
// (detail::select_top_k on many heads in one launch), attention with forced key splits (the CPU
// cache's attend), conversion of every input dtype, and the first-invalid-element search.
#include <algorithm>
#include <catch2/catch.hpp>
#include <climits>
#include <cmath>
#include <cstdint>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/backend/cuda/runtime.hpp>
#include <kvpack/kvpack.hpp>
#include <random>
#include <vector>

#include "device_test_util.hpp"

using kvpack::ActivationView;
using kvpack::BFloat16;
using kvpack::Half;
using kvpack::ModelShape;
using kvpack::OutputView;
namespace kc = kvpack::cuda;
using kvpack::test::download;
using kvpack::test::upload;

namespace {

/// The device jobs of host selection heads whose scores and positions were uploaded
/// concatenated (head h from offsets[h]).
std::vector<kc::SelectJob> select_jobs(const std::vector<kvpack::detail::SelectionHead>& cpu,
                                       const std::vector<int64_t>& offsets, const float* scores,
                                       const int32_t* positions) {
  std::vector<kc::SelectJob> jobs(cpu.size());
  for (std::size_t h = 0; h < cpu.size(); ++h) {
    jobs[h] = {scores + offsets[h],  positions + offsets[h], cpu[h].size, cpu[h].target,
               cpu[h].protect_below, cpu[h].protect_above,   offsets[h]};
  }
  return jobs;
}

}  // namespace

TEST_CASE("CUDA kernels: select_top_k + kept_indices equal detail::select_top_k", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(3);
  const int64_t heads = 300;
  std::vector<std::vector<float>> scores(heads);
  std::vector<std::vector<int32_t>> positions(heads);
  std::vector<kvpack::detail::SelectionHead> cpu(heads);
  std::vector<int64_t> offsets(heads);
  int64_t total = 0;
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t size = std::vector<int64_t>{0, 1, 7, 255, 256, 257, 1000, 3001}[h % 8];
    scores[h].resize(size);
    positions[h].resize(size);
    int32_t p = static_cast<int32_t>(rng() % 4);
    for (int64_t i = 0; i < size; ++i) {
      p += 1 + static_cast<int32_t>(rng() % 2);
      positions[h][i] = p;
      scores[h][i] = h % 3 == 0 ? static_cast<float>(static_cast<int>(rng() % 7) - 3)
                                : -std::normal_distribution<float>(8.0f, 2.0f)(rng);
    }
    const int64_t target = size == 0 ? 0 : static_cast<int64_t>(rng() % (size + 2));
    const int64_t first = size ? positions[h][0] : 0, last = size ? positions[h][size - 1] : 0;
    cpu[h] = {scores[h].data(),
              positions[h].data(),
              size,
              target,
              first + static_cast<int64_t>(rng() % 5),
              last - static_cast<int64_t>(rng() % 20)};
    offsets[h] = total;
    total += size;
  }
  std::vector<float> all_scores;
  std::vector<int32_t> all_positions;
  for (int64_t h = 0; h < heads; ++h) {
    all_scores.insert(all_scores.end(), scores[h].begin(), scores[h].end());
    all_positions.insert(all_positions.end(), positions[h].begin(), positions[h].end());
  }
  auto d_scores = upload(all_scores);
  auto d_positions = upload(all_positions);
  auto d_jobs = upload(select_jobs(cpu, offsets, d_scores.data(), d_positions.data()));
  kc::DeviceBuffer<uint8_t> d_flags(total, 0);
  kc::DeviceBuffer<int32_t> d_index(total, 0);
  kc::DeviceBuffer<kc::SelectResult> d_results(heads, 0);
  kc::launch_select_top_k(d_jobs.data(), heads, d_flags.data(), d_results.data(), d_index.data(),
                          nullptr);
  kc::check_cuda(cudaDeviceSynchronize(), "select kernels");
  const auto results = download(d_results, heads);
  const auto index = download(d_index, total);
  for (int64_t h = 0; h < heads; ++h) {
    const auto expected = kvpack::detail::select_top_k(cpu[h]);
    INFO("head " << h << " size " << cpu[h].size << " target " << cpu[h].target);
    REQUIRE(results[h].kept == static_cast<int64_t>(expected.size()));
    REQUIRE(results[h].first_position == (expected.empty() ? -1 : positions[h][expected[0]]));
    for (std::size_t j = 0; j < expected.size(); ++j) REQUIRE(index[offsets[h] + j] == expected[j]);
  }
}

TEST_CASE("CUDA kernels: select_global equals detail::select_global", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  // Rounds: ties on few distinct scores, protection that exceeds the room, a room of 0 that
  // empties unprotected heads (each keeps its best token), and room >= every candidate.
  for (int round = 0; round < 4; ++round) {
    std::mt19937 rng(40 + round);
    const int64_t heads = round == 0 ? 90 : 40;
    std::vector<std::vector<float>> scores(heads);
    std::vector<std::vector<int32_t>> positions(heads);
    std::vector<kvpack::detail::SelectionHead> cpu(heads);
    std::vector<float> all_scores;
    std::vector<int32_t> all_positions;
    std::vector<int64_t> offsets(heads);
    int64_t total = 0, longest = 0, target_sum = 0;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t size = std::vector<int64_t>{0, 1, 5, 64, 300, 1000}[(h * 7 + round) % 6];
      for (int64_t i = 0; i < size; ++i) {
        positions[h].push_back(static_cast<int32_t>(3 * i + h % 3));
        scores[h].push_back(round == 0 ? static_cast<float>(static_cast<int>(rng() % 5))
                                       : std::normal_distribution<float>(0.0f, 3.0f)(rng));
      }
      const int64_t target = round == 2 ? 0 : (round == 3 ? size : size / 4);
      const int64_t last = size ? positions[h].back() : 0;
      const int64_t sinks = round == 2 ? (h % 2 ? 2 : 0) : 1 + h % 4;
      const int64_t recent = round == 2 ? 0 : 3 * (h % 5);
      cpu[h] = {nullptr, nullptr, size, target, sinks, last - recent};
      offsets[h] = total;
      total += size;
      longest = std::max(longest, size);
      target_sum += target;
      all_scores.insert(all_scores.end(), scores[h].begin(), scores[h].end());
      all_positions.insert(all_positions.end(), positions[h].begin(), positions[h].end());
    }
    for (int64_t h = 0; h < heads; ++h) {
      cpu[h].scores = all_scores.data() + offsets[h];
      cpu[h].positions = all_positions.data() + offsets[h];
    }
    const auto expected = kvpack::detail::select_global(cpu);
    auto d_scores = upload(all_scores);
    auto d_positions = upload(all_positions);
    auto d_jobs = upload(select_jobs(cpu, offsets, d_scores.data(), d_positions.data()));
    kc::DeviceBuffer<uint8_t> d_flags(total, 0);
    kc::DeviceBuffer<int32_t> d_index(total, 0);
    kc::DeviceBuffer<kc::SelectResult> d_results(heads, 0);
    kc::DeviceBuffer<kc::GlobalSelectState> d_state(1, 0);
    kc::check_cuda(cudaMemset(d_state.data(), 0, sizeof(kc::GlobalSelectState)), "memset");
    kc::launch_select_global(d_jobs.data(), heads, total, longest, target_sum, d_flags.data(),
                             d_results.data(), d_index.data(), d_state.data(), nullptr);
    kc::check_cuda(cudaDeviceSynchronize(), "select_global kernels");
    const auto results = download(d_results, heads);
    const auto index = download(d_index, total);
    for (int64_t h = 0; h < heads; ++h) {
      INFO("round " << round << " head " << h << " size " << cpu[h].size);
      REQUIRE(results[h].kept == static_cast<int64_t>(expected[h].size()));
      REQUIRE(results[h].first_position ==
              (expected[h].empty() ? -1 : positions[h][expected[h][0]]));
      for (std::size_t j = 0; j < expected[h].size(); ++j) {
        REQUIRE(index[offsets[h] + j] == expected[h][j]);
      }
    }
  }
}

TEST_CASE("CUDA kernels: attention with forced key splits equals the CPU attend", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const std::vector<ModelShape> shapes{
      {1, 4, 4, 64, {}}, {1, 6, 2, 128, {}}, {1, 16, 2, 64, {}}, {1, 24, 3, 128, {}}};
  uint32_t seed = 10;
  for (const ModelShape& s : shapes) {
    const int64_t n = 700, tokens = 21, d = s.head_dim;
    std::mt19937 rng(seed++);
    std::normal_distribution<float> gauss(0.0f, 1.0f);
    std::vector<float> k(n * s.kv_heads * d), v(k.size()), q(tokens * s.q_heads * d);
    for (auto& x : k) x = gauss(rng);
    for (auto& x : v) x = gauss(rng);
    for (auto& x : q) x = gauss(rng);
    std::vector<int64_t> pos(n), qpos(tokens);
    for (int64_t t = 0; t < n; ++t) pos[t] = 5 + 3 * t;
    for (auto& p : qpos) p = 5 + static_cast<int64_t>(rng() % (3 * n - 2));
    qpos[0] = pos[n - 1];
    qpos[1] = pos[0];
    kvpack::KVCache<kvpack::Identity> cache(s);
    cache.append(0, ActivationView::nhd(k.data(), n, s.kv_heads, d),
                 ActivationView::nhd(v.data(), n, s.kv_heads, d), pos);
    std::vector<float> expected(q.size());
    cache.attend(0, ActivationView::nhd(q.data(), tokens, s.q_heads, d), qpos,
                 OutputView::nhd(expected.data(), tokens, s.q_heads, d));

    // The stored rows (fp16) and positions of each head, uploaded as the CUDA cache holds them.
    const auto dense = cache.materialize(0);
    std::vector<kc::DeviceBuffer<Half>> dk, dv;
    std::vector<kc::DeviceBuffer<int32_t>> dp;
    std::vector<kc::AttentionHead<Half>> heads;
    for (int h = 0; h < s.kv_heads; ++h) {
      std::vector<Half> hk(dense.heads[h].k.size()), hv(hk.size());
      for (std::size_t i = 0; i < hk.size(); ++i) hk[i] = kvpack::to_half(dense.heads[h].k[i]);
      for (std::size_t i = 0; i < hv.size(); ++i) hv[i] = kvpack::to_half(dense.heads[h].v[i]);
      dk.push_back(upload(hk));
      dv.push_back(upload(hv));
      dp.push_back(upload(
          std::vector<int32_t>(dense.heads[h].positions.begin(), dense.heads[h].positions.end())));
      heads.push_back({dk.back().data(), dv.back().data(), dp.back().data(), n});
    }
    auto d_heads = upload(heads);
    auto d_q = upload(q);
    auto d_qpos = upload(std::vector<int32_t>(qpos.begin(), qpos.end()));
    for (int64_t splits : {1, 2, 5, 32}) {
      const int64_t rows = tokens * s.q_heads;
      kc::DeviceBuffer<float> acc(splits * rows * d, 0), mx(splits * rows, 0),
          sum(splits * rows, 0), out(rows * d, 0);
      kc::AttentionParams params{};
      params.q = d_q.data();
      params.q_positions = d_qpos.data();
      params.tokens = tokens;
      params.q_heads = s.q_heads;
      params.group = s.group_size();
      params.scale = 1.0f / std::sqrt(static_cast<float>(d));
      params.splits = splits;
      params.partial_acc = acc.data();
      params.partial_max = mx.data();
      params.partial_sum = sum.data();
      kc::dispatch_head_dim(s.head_dim, [&](auto D) {
        kc::launch_attention<Half, decltype(D)::value>(d_heads.data(), s.kv_heads, params,
                                                       out.data(), s.q_heads * d, d, nullptr);
      });
      kc::check_cuda(cudaDeviceSynchronize(), "attention kernels");
      const auto got = download(out, rows * d);
      double num = 0, den = 0;
      for (std::size_t i = 0; i < got.size(); ++i) {
        num += (static_cast<double>(got[i]) - expected[i]) * (got[i] - expected[i]);
        den += static_cast<double>(expected[i]) * expected[i];
      }
      INFO("q_heads " << s.q_heads << " kv_heads " << s.kv_heads << " splits " << splits);
      REQUIRE(num / den < 1e-6);
    }
  }
}

TEST_CASE("CUDA kernels: conversion of fp32/fp16/bf16 strided rows is exact", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const int64_t n = 33, heads = 3, d = 64, ts = d + 8, hs = n * ts + 8;  // padded heads-first
  std::mt19937 rng(5);
  std::normal_distribution<float> gauss(0.0f, 300.0f);
  std::vector<float> x(heads * hs);
  for (auto& e : x) e = gauss(rng);
  std::vector<Half> x16(x.size());
  std::vector<BFloat16> xb(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x16[i] = kvpack::to_half(x[i]);
    xb[i] = kvpack::to_bfloat16(x[i]);
  }
  auto d32 = upload(x);
  auto d16 = upload(x16);
  auto db = upload(xb);
  for (int dtype = 0; dtype < 3; ++dtype) {
    const ActivationView view = dtype == 0
                                    ? ActivationView(d32.data(), n, heads, d, ts, hs)
                                    : (dtype == 1 ? ActivationView(d16.data(), n, heads, d, ts, hs)
                                                  : ActivationView(db.data(), n, heads, d, ts, hs));
    kc::DeviceBuffer<Half> rows16(heads * n * d, 0);
    kc::DeviceBuffer<float> rows32(heads * n * d, 0);
    std::vector<Half*> t16;
    std::vector<float*> t32;
    for (int64_t h = 0; h < heads; ++h) {
      t16.push_back(rows16.data() + h * n * d);
      t32.push_back(rows32.data() + h * n * d);
    }
    auto d_t16 = upload(t16);
    auto d_t32 = upload(t32);
    kc::launch_convert_rows(view, d_t16.data(), d, nullptr);
    kc::launch_convert_rows(view, d_t32.data(), d, nullptr);
    kc::check_cuda(cudaDeviceSynchronize(), "convert kernels");
    const auto got16 = download(rows16, heads * n * d);
    const auto got32 = download(rows32, heads * n * d);
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t i = 0; i < d; ++i) {
          const int64_t src = h * hs + t * ts + i;
          const float value =
              dtype == 0 ? x[src]
                         : (dtype == 1 ? kvpack::to_float(x16[src]) : kvpack::to_float(xb[src]));
          const int64_t dst = (h * n + t) * d + i;
          REQUIRE(got16[dst].bits == kvpack::to_half(value).bits);
          REQUIRE(got32[dst] == value);
        }
      }
    }
  }
}

TEST_CASE("CUDA kernels: the first invalid element is the one the host check reports", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const int64_t n = 50, heads = 4, d = 128;
  std::vector<float> x(n * heads * d, 1.0f);
  kc::DeviceBuffer<unsigned long long> first(1, 0);
  auto run = [&](const std::vector<float>& values, float limit) {
    auto dx = upload(values);
    kc::check_cuda(cudaMemset(first.data(), 0xFF, sizeof(unsigned long long)), "memset");
    kc::launch_find_first_invalid(ActivationView::nhd(dx.data(), n, heads, d), limit, first.data(),
                                  nullptr);
    kc::check_cuda(cudaDeviceSynchronize(), "find_first_invalid");
    return download(first, 1)[0];
  };
  REQUIRE(run(x, 65504.0f) == ULLONG_MAX);
  auto y = x;
  y[(40 * heads + 2) * d + 100] = NAN;
  y[(7 * heads + 3) * d + 5] = 70000.0f;
  y[(7 * heads + 3) * d + 9] = -INFINITY;
  REQUIRE(run(y, 65504.0f) == static_cast<unsigned long long>((7 * heads + 3) * d + 5));
  REQUIRE(run(y, 3.4e38f) == static_cast<unsigned long long>((7 * heads + 3) * d + 9));
}
