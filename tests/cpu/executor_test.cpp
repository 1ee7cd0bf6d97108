// Executors (executor.hpp): the thread pool's contract (every index once, concurrent and nested
// calls, failures carried to the caller), KVPACK_NUM_THREADS, and caches that run their parallel
// loops on the executor they are given with results independent of it.
#include <atomic>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <kvpack/kvpack.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

namespace {

/// Counts the tasks it runs, delegating to a ThreadPool.
class CountingExecutor final : public kvpack::Executor {
 public:
  explicit CountingExecutor(int threads) : pool_(threads) {}
  int concurrency() const override { return pool_.concurrency(); }
  void parallel_for(int64_t n, kvpack::TaskRef task) override {
    calls.fetch_add(1);
    tasks.fetch_add(n);
    pool_.parallel_for(n, task);
  }
  std::atomic<int64_t> calls{0}, tasks{0};

 private:
  kvpack::ThreadPool pool_;
};

void check_each_index_once(kvpack::Executor& executor, int64_t n) {
  std::vector<std::atomic<int>> hits(n);
  for (auto& h : hits) h.store(0);
  auto task = [&](int64_t i) { hits[i].fetch_add(1); };
  executor.parallel_for(n, kvpack::TaskRef(task));
  for (int64_t i = 0; i < n; ++i) REQUIRE(hits[i].load() == 1);
}

}  // namespace

TEST_CASE("executor: a thread pool runs every index exactly once, from concurrent and nested calls",
          "[executor][threads]") {
  kvpack::ThreadPool pool(4);
  CHECK(pool.concurrency() == 4);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{1000}})
    check_each_index_once(pool, n);

  // Four threads submit at once; every call sees all of its own indices.
  std::vector<std::thread> callers;
  std::atomic<int> ok{0};
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int round = 0; round < 20; ++round) {
        std::atomic<int64_t> sum{0};
        auto task = [&](int64_t i) { sum.fetch_add(i + 1); };
        pool.parallel_for(300, kvpack::TaskRef(task));
        if (sum.load() == 300 * 301 / 2) ok.fetch_add(1);
      }
    });
  }
  for (auto& t : callers) t.join();
  CHECK(ok.load() == 80);

  // A task that calls parallel_for on the same pool (the caller works on its own call).
  std::atomic<int64_t> inner{0};
  auto outer = [&](int64_t) {
    auto leaf = [&](int64_t) { inner.fetch_add(1); };
    pool.parallel_for(50, kvpack::TaskRef(leaf));
  };
  pool.parallel_for(8, kvpack::TaskRef(outer));
  CHECK(inner.load() == 400);

  kvpack::SerialExecutor serial;
  CHECK(serial.concurrency() == 1);
  check_each_index_once(serial, 17);
}

TEST_CASE("executor: a failing task reaches the caller, the lowest failing index wins",
          "[executor][threads]") {
  kvpack::ThreadPool pool(3);
  std::atomic<int> ran{0};
  auto body = [&](int64_t i) {
    ran.fetch_add(1);
    if (i == 70 || i == 30) throw std::runtime_error("task " + std::to_string(i));
  };
  CHECK_THROWS_WITH(kvpack::detail::parallel_for(pool, 100, body), "task 30");
  CHECK(ran.load() == 100);  // every task ran: the error does not depend on the schedule
  kvpack::SerialExecutor serial;
  CHECK_THROWS_WITH(kvpack::detail::parallel_for(serial, 100, body), "task 30");
}

TEST_CASE("executor: KVPACK_NUM_THREADS sets the default pool's size when it is a count",
          "[executor]") {
  const char* old = std::getenv("KVPACK_NUM_THREADS");
  const std::string saved = old != nullptr ? old : "";
  const auto count_for = [](const char* value) {
    setenv("KVPACK_NUM_THREADS", value, 1);
    return kvpack::detail::default_thread_count();
  };
  CHECK(count_for("3") == 3);
  CHECK(count_for("1") == 1);
  CHECK(count_for("0") == 0);  // 0: the hardware's count
  CHECK(count_for("-2") == 0);
  CHECK(count_for("4x") == 0);
  CHECK(count_for("") == 0);
  if (old != nullptr) {
    setenv("KVPACK_NUM_THREADS", saved.c_str(), 1);
  } else {
    unsetenv("KVPACK_NUM_THREADS");
  }
  CHECK(kvpack::default_executor().concurrency() >= 1);
}

TEST_CASE(
    "executor: a cache runs its loops on the executor it is given, results do not depend "
    "on it",
    "[executor][threads]") {
  const kvpack::ModelShape shape{2, 8, 2, 64, {}};
  const auto q = kvpack_test::random_values(300 * shape.q_heads * shape.head_dim, 91);
  const auto q_view = kvpack::ActivationView::nhd(q.data(), 300, shape.q_heads, shape.head_dim);
  const auto positions = kvpack_test::iota_positions(300, 300);
  // KVzip: observe (scoring tasks), compress (eviction tasks), attend over what is kept.
  const auto run = [&](kvpack::Executor* executor) {
    kvpack::KVCache<kvpack::ReconstructionEvict> cache(
        shape,
        kvpack::ReconstructionEvict(kvpack::Budget::ratio(0.4, kvpack::BudgetScope::kGlobal)));
    cache.set_executor(executor);
    for (int l = 0; l < shape.layers; ++l) kvpack_test::fill_layer(cache, l, 600, 92 + l);
    for (int l = 0; l < shape.layers; ++l) cache.observe(l, q_view, positions);
    cache.compress();
    std::vector<float> out(q.size());
    cache.attend(1, q_view, positions,
                 kvpack::OutputView::nhd(out.data(), 300, shape.q_heads, shape.head_dim));
    return std::make_pair(out, cache.materialize(0).heads[1].positions);
  };
  CountingExecutor counting(3);
  kvpack::SerialExecutor serial;
  const auto a = run(&counting);
  CHECK(counting.calls.load() > 0);
  CHECK(counting.tasks.load() > counting.calls.load());
  const auto b = run(&serial);
  const auto c = run(nullptr);  // default_executor()
  CHECK(a.first == b.first);    // bit for bit
  CHECK(a.first == c.first);
  CHECK(a.second == b.second);
  CHECK(a.second == c.second);

  kvpack::KVCache<kvpack::Identity> plain(shape);
  CHECK(&plain.executor() == &kvpack::default_executor());
  plain.set_executor(&serial);
  CHECK(&plain.executor() == &serial);
  const auto copy = plain;  // copies share the executor
  CHECK(&copy.executor() == &serial);
}
