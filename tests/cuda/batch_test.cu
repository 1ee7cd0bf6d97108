// KVCacheBatch<Policy, backend::Cuda>: sequences by id on one context, attend() of a batch in one
// attention launch, against each sequence's own attend() (the same kernel over the same heads;
// the key splits are chosen for the whole launch, so sums may differ in order: < 1e-6
// normalised) and the CPU batch; entry errors named, nothing written.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/kvpack.hpp>
#include <type_traits>
#include <vector>

#include "cache_checks.hpp"
#include "device_test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::BatchQuery;
using kvpack::Budget;
using kvpack::KVCacheBatch;
using kvpack::MemorySpace;
using kvpack::ModelShape;
using kvpack::OutputView;
namespace backend = kvpack::backend;

using namespace cache_checks;

namespace {

/// Sequences 3, 7 and 9 of 90, 400 (several key splits) and 200 tokens in a CUDA and a CPU
/// batch; then, for q and out in `space`, a batch of decode tokens, a 3-token chunk and one
/// sequence named twice, attended on every layer and compared.
template <class Policy>
void check_batch(const ModelShape& s, const Policy& policy, MemorySpace space, uint32_t seed) {
  KVCacheBatch<Policy, backend::Cuda> gpu(s, policy);
  KVCacheBatch<Policy, backend::Cpu> cpu(s, policy);
  const std::vector<int64_t> ids{3, 7, 9}, lengths{90, 400, 200};
  for (std::size_t i = 0; i < ids.size(); ++i) {
    feed_sequence(s, lengths[i], 0, false, gpu.add(ids[i]), cpu.add(ids[i]));
    gpu.sequence(ids[i]).compress();
    cpu.sequence(ids[i]).compress();
  }
  REQUIRE(gpu.ids() == ids);
  const int64_t d = s.head_dim, row = s.q_heads * d;
  // Attends entries (sequence, query tokens, first position) on every layer and compares.
  auto run = [&](const std::vector<int64_t>& seq, const std::vector<int64_t>& tokens,
                 const std::vector<int64_t>& first) {
    for (int l = 0; l < s.layers; ++l) {
      INFO("layer " << l << (space == MemorySpace::kDevice ? ", device views" : ", host views"));
      std::vector<std::vector<float>> q(seq.size()), got(seq.size()), cpu_out(seq.size());
      std::vector<std::vector<int64_t>> pos(seq.size());
      std::vector<kvpack::cuda::DeviceBuffer<float>> dq, dout;
      std::vector<BatchQuery> batch, cpu_batch;
      for (std::size_t i = 0; i < seq.size(); ++i) {
        q[i] = random_values(tokens[i] * row, seed++, 1.0f);
        got[i].assign(q[i].size(), -7.0f);
        cpu_out[i].assign(q[i].size(), 0.0f);
        pos[i] = positions_range(first[i], tokens[i]);
        cpu_batch.push_back({seq[i], ActivationView::nhd(q[i].data(), tokens[i], s.q_heads, d),
                             pos[i], OutputView::nhd(cpu_out[i].data(), tokens[i], s.q_heads, d)});
        if (space == MemorySpace::kDevice) {
          dq.emplace_back(q[i].size(), 0);
          dout.emplace_back(q[i].size(), 0);
          REQUIRE(cudaMemcpy(dq.back().data(), q[i].data(), dq.back().bytes(),
                             cudaMemcpyHostToDevice) == cudaSuccess);
          batch.push_back({seq[i], ActivationView::nhd(dq.back().data(), tokens[i], s.q_heads, d),
                           pos[i], OutputView::nhd(dout.back().data(), tokens[i], s.q_heads, d)});
        } else {
          batch.push_back({seq[i], ActivationView::nhd(q[i].data(), tokens[i], s.q_heads, d),
                           pos[i], OutputView::nhd(got[i].data(), tokens[i], s.q_heads, d)});
        }
      }
      gpu.attend(l, batch, space);
      cpu.attend(l, cpu_batch);
      for (std::size_t i = 0; i < seq.size(); ++i) {
        INFO("entry " << i);
        if (space == MemorySpace::kDevice) {
          REQUIRE(cudaMemcpy(got[i].data(), dout[i].data(), dout[i].bytes(),
                             cudaMemcpyDeviceToHost) == cudaSuccess);
        }
        std::vector<float> alone(q[i].size());
        gpu.sequence(seq[i]).attend(l, ActivationView::nhd(q[i].data(), tokens[i], s.q_heads, d),
                                    pos[i], OutputView::nhd(alone.data(), tokens[i], s.q_heads, d));
        REQUIRE(normalised_error(got[i], alone) < 1e-6);
        REQUIRE(normalised_error(got[i], cpu_out[i]) < 1e-5);
      }
    }
  };
  // Decode steps, a chunk inside sequence 7, and sequence 3 again at an earlier position.
  run({3, 7, 9, 7, 3}, {1, 1, 1, 3, 1}, {89, 399, 199, 250, 40});
  // Two decode steps, the long sequence second: with one kv head the launch has 2 blocks, so it
  // splits the keys (the second entry's partial states start at a row offset).
  int sm_count = 0;
  REQUIRE(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess);
  if (s.kv_heads == 1) REQUIRE(kvpack::cuda::attention_splits(2, 400, sm_count) > 1);
  run({9, 7}, {1, 1}, {199, 399});
  std::size_t sum = 0;
  for (int64_t id : ids) sum += gpu.sequence(id).bytes();
  REQUIRE(gpu.bytes() > sum);  // plus the batch's table
  gpu.remove(7);
  REQUIRE(gpu.ids() == std::vector<int64_t>{3, 9});
  REQUIRE_FALSE(gpu.contains(7));
}

}  // namespace

TEST_CASE("CUDA KVCacheBatch: one attention launch equals each sequence's attend", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const ModelShape gqa{2, 6, 2, 128, {}};
  for (const MemorySpace space : {MemorySpace::kHost, MemorySpace::kDevice}) {
    check_batch(gqa, kvpack::Identity{}, space, 10);
    // Ragged heads: L2 keeps a different count per head; KIVI blocks + fp16 residual.
    check_batch(gqa, kvpack::L2NormEvict(Budget::ratio(0.5), 0), space, 20);
    check_batch(ModelShape{1, 8, 2, 64, {}}, kvpack::Quantize(4, 32, 32), space, 30);
    check_batch(ModelShape{1, 4, 1, 64, {}}, kvpack::Identity{}, space, 40);
  }
}

/// fork() of a sequence after compress(): the copy attends bit for bit as its source and holds
/// the same bytes; the two then diverge without touching each other.
template <class Policy>
void check_fork(const ModelShape& s, const Policy& policy) {
  KVCacheBatch<Policy, backend::Cuda> batch(s, policy);
  feed_sequence(s, 150, 0, false, batch.add(1));
  batch.sequence(1).compress();
  // Every policy here but Identity holds less than the fp16 rows (evicted, quantized, factored).
  if (!std::is_same<Policy, kvpack::Identity>::value) {
    REQUIRE(batch.sequence(1).bytes() < batch.sequence(1).dense_bytes());
  }
  auto& copy = batch.fork(1, 2);
  REQUIRE(batch.ids() == std::vector<int64_t>{1, 2});
  REQUIRE(copy.bytes() == batch.sequence(1).bytes());
  const auto q = random_values(s.q_heads * s.head_dim, 9);
  const auto qv = ActivationView::nhd(q.data(), 1, s.q_heads, s.head_dim);
  const std::vector<int64_t> qpos = positions_range(149, 1);
  for (int l = 0; l < s.layers; ++l) {
    std::vector<float> a(q.size()), b(q.size());
    batch.sequence(1).attend(l, qv, qpos, OutputView::nhd(a.data(), 1, s.q_heads, s.head_dim));
    copy.attend(l, qv, qpos, OutputView::nhd(b.data(), 1, s.q_heads, s.head_dim));
    REQUIRE(a == b);
    const auto x = batch.sequence(1).materialize(l), y = copy.materialize(l);
    for (std::size_t h = 0; h < x.heads.size(); ++h) {
      REQUIRE(x.heads[h].positions == y.heads[h].positions);
      REQUIRE(x.heads[h].k == y.heads[h].k);
      REQUIRE(x.heads[h].v == y.heads[h].v);
    }
  }
  // A decode token appended to the copy only: the source's rows stay as they were.
  const auto source_rows = batch.sequence(1).materialize(0);
  for (int l = 0; l < s.layers; ++l) {
    const auto kv = random_values(s.kv_heads * s.head_dim, 50 + l);
    const auto view = ActivationView::nhd(kv.data(), 1, s.kv_heads, s.head_dim);
    copy.append(l, view, view, positions_range(150, 1));
  }
  REQUIRE(copy.tokens(0, 0) == batch.sequence(1).tokens(0, 0) + 1);
  const auto after = batch.sequence(1).materialize(0);
  for (std::size_t h = 0; h < after.heads.size(); ++h) {
    REQUIRE(after.heads[h].positions == source_rows.heads[h].positions);
    REQUIRE(after.heads[h].k == source_rows.heads[h].k);
    REQUIRE(after.heads[h].v == source_rows.heads[h].v);
  }
  REQUIRE_THROWS_WITH(batch.fork(7, 3), Contains("sequence"));
  REQUIRE_THROWS_WITH(batch.fork(1, 2), Contains("not in the batch"));
  // The copy does not depend on its source: its attention is the same after a remove().
  const auto decode_pos = positions_range(150, 1);
  std::vector<float> before(q.size()), out(q.size());
  copy.attend(0, qv, decode_pos, OutputView::nhd(before.data(), 1, s.q_heads, s.head_dim));
  batch.remove(1);
  copy.attend(0, qv, decode_pos, OutputView::nhd(out.data(), 1, s.q_heads, s.head_dim));
  REQUIRE(out == before);
}

TEST_CASE("CUDA KVCacheBatch: a fork of a scored sequence keeps its scores", "[cuda][eviction]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  // KVzip observed, then forked: both compress to the same kept set as the CPU sequence.
  const ModelShape s{2, 6, 2, 64, {}};
  const kvpack::ReconstructionEvict policy(Budget::ratio(0.4, kvpack::BudgetScope::kGlobal));
  KVCacheBatch<kvpack::ReconstructionEvict, backend::Cuda> batch(s, policy);
  kvpack::KVCache<kvpack::ReconstructionEvict, backend::Cpu> cpu(s, policy);
  feed_sequence(s, 120, 0, false, batch.add(1), cpu);
  const auto q = random_values(8 * s.q_heads * s.head_dim, 13, 1.5f);
  const auto qv = ActivationView::nhd(q.data(), 8, s.q_heads, s.head_dim);
  for (int l = 0; l < s.layers; ++l) {
    batch.sequence(1).observe(l, qv, positions_range(100, 8));
    cpu.observe(l, qv, positions_range(100, 8));
  }
  auto& copy = batch.fork(1, 2);
  copy.compress();
  batch.sequence(1).compress();
  cpu.compress();
  for (int l = 0; l < s.layers; ++l) {
    const auto x = cpu.materialize(l), y = copy.materialize(l),
               z = batch.sequence(1).materialize(l);
    for (std::size_t h = 0; h < x.heads.size(); ++h) {
      INFO("layer " << l << " head " << h);
      REQUIRE(y.heads[h].positions == x.heads[h].positions);
      REQUIRE(z.heads[h].positions == x.heads[h].positions);
    }
  }
  REQUIRE(copy.bytes() < copy.dense_bytes());  // it evicted
}

TEST_CASE("CUDA KVCacheBatch: fork copies a sequence on the device", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const ModelShape s{2, 6, 2, 64, {}};
  check_fork(s, kvpack::Identity{});
  check_fork(s, kvpack::L2NormEvict(Budget::ratio(0.5), 0));
  check_fork(s, kvpack::Quantize(4, 32, 32));
  check_fork(s, kvpack::CrossLayerSVD(2, 32, 32));  // token bases shared by a group's heads
}

TEST_CASE("CUDA KVCacheBatch: bad entries are named and nothing is written", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const ModelShape s{1, 4, 2, 64, {}};
  KVCacheBatch<kvpack::Identity, backend::Cuda> batch(s);
  feed_sequence(s, 50, 0, false, batch.add(1));
  feed_sequence(s, 20, 0, false, batch.add(2));
  REQUIRE_THROWS_WITH(batch.add(1), Contains("id") && Contains("not in the batch"));
  REQUIRE_THROWS_WITH(batch.remove(5), Contains("an id in the batch"));
  const auto q = random_values(s.q_heads * s.head_dim, 5);
  std::vector<float> out_a(q.size(), -7.0f), out_b(q.size(), -7.0f);
  const std::vector<int64_t> p_a = positions_range(49, 1), p_b = positions_range(19, 1);
  const auto qv = ActivationView::nhd(q.data(), 1, s.q_heads, s.head_dim);
  const auto a = OutputView::nhd(out_a.data(), 1, s.q_heads, s.head_dim);
  const auto b = OutputView::nhd(out_b.data(), 1, s.q_heads, s.head_dim);
  // An unknown sequence, then a query position before every key of its sequence: the entry is
  // named and the first entry's output is left as it was.
  REQUIRE_THROWS_WITH(batch.attend(0, {{1, qv, p_a, a}, {4, qv, p_b, b}}),
                      Contains("entry 1") && Contains("sequence"));
  const std::vector<int64_t> early{-5};
  REQUIRE_THROWS_WITH(batch.attend(0, {{1, qv, p_a, a}, {2, qv, early, b}}), Contains("entry 1"));
  for (float x : out_a) REQUIRE(x == -7.0f);
  batch.attend(0, {{1, qv, p_a, a}, {2, qv, p_b, b}});
  REQUIRE(out_a[0] != -7.0f);
  REQUIRE(out_b[0] != -7.0f);
  REQUIRE(normalised_error(out_a, out_b) > 1e-3);  // two sequences, two outputs
}
