/// \file executor.hpp
/// \brief Where the CPU backend runs its parallel loops: a thread count, the engine's own thread
/// pool, or none.
///
/// Every parallel loop of the CPU backend (attention work items, observe() scoring, eviction
/// scoring and compaction, KIVI quantization, low-rank factorization jobs) goes through one
/// Executor. A cache uses default_executor() unless given another with set_executor(): a process-
/// wide ThreadPool of KVPACK_NUM_THREADS threads (environment, read once) or else
/// std::thread::hardware_concurrency(). Idle threads block on a condition variable: nothing spins,
/// so a busy machine loses no time slices to waiting threads. An engine with its own pool
/// implements Executor (two members) and hands it in; SerialExecutor runs everything on the
/// calling thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kvpack {

/// \brief A non-owning reference to a callable `void(int64_t)`: what Executor runs, without an
/// allocation per call (the referenced callable must outlive the call).
class TaskRef {
 public:
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, TaskRef>>>
  TaskRef(F& f)  // NOLINT(google-explicit-constructor): a reference, as std::function_ref
      : object_(static_cast<void*>(&f)),
        call_([](void* o, int64_t i) { (*static_cast<F*>(o))(i); }) {}
  void operator()(int64_t i) const { call_(object_, i); }

 private:
  void* object_;
  void (*call_)(void*, int64_t);
};

/// \brief Runs the CPU backend's parallel loops.
///
/// Contract for implementations: parallel_for(n, task) calls task(i) exactly once for every i in
/// [0, n), in any order and possibly concurrently, and returns when every call has returned. It
/// may be called from several threads at once and from inside a task (kvpack does neither on
/// its own, but two threads attending one cache do). kvpack's tasks do not throw (failures are
/// carried to the caller by kvpack).
class Executor {
 public:
  virtual ~Executor() = default;
  /// Threads that may run tasks at once, the calling thread included (>= 1). kvpack sizes its
  /// per-thread scratch and its work splits by it.
  virtual int concurrency() const = 0;
  /// See the class contract.
  virtual void parallel_for(int64_t n, TaskRef task) = 0;
};

/// \brief Runs every task on the calling thread, in index order.
class SerialExecutor final : public Executor {
 public:
  int concurrency() const override { return 1; }
  void parallel_for(int64_t n, TaskRef task) override {
    for (int64_t i = 0; i < n; ++i) task(i);
  }
};

/// \brief A fixed pool of std::threads that block (condition variable) while idle. The calling
/// thread runs tasks too, so `threads` counts it: ThreadPool(4) starts 3 threads.
///
/// Tasks are handed out one index at a time (dynamic scheduling). Concurrent parallel_for calls
/// share the workers; a call's own thread keeps working on its call, so calls never wait for
/// one another's tasks. Under OpenMP, tasks run with one OpenMP thread per pool thread, so Eigen
/// products inside a task do not start nested teams.
class ThreadPool final : public Executor {
 public:
  /// `threads` in total, the caller included; <= 0: std::thread::hardware_concurrency().
  explicit ThreadPool(int threads = 0) {
    if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    workers_.reserve(threads - 1);
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this] { work(); });
  }
  ~ThreadPool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int concurrency() const override { return static_cast<int>(workers_.size()) + 1; }

  void parallel_for(int64_t n, TaskRef task) override {
    if (n <= 0) return;
    if (n == 1 || workers_.empty()) {
      for (int64_t i = 0; i < n; ++i) task(i);
      return;
    }
    Job job{task, n};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back(&job);
    }
    wake_.notify_all();
    const int64_t completed = run(job);
    std::unique_lock<std::mutex> lock(mutex_);
    retire(job);
    job.done += completed;
    // Workers that took indices of this job finish them and detach before `job` may go away.
    job.finished.wait(lock, [&] { return job.done == job.n && job.attached == 0; });
  }

 private:
  struct Job {
    TaskRef task;
    int64_t n;
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // tasks returned (under mutex_)
    int attached = 0;  // workers inside run(job) (under mutex_)
    std::condition_variable finished;
    Job(TaskRef t, int64_t count) : task(t), n(count) {}
  };

  /// Runs indices of `job` until none is left; returns how many this thread ran.
  static int64_t run(Job& job) {
#if defined(_OPENMP)
    const int omp_threads = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    int64_t completed = 0;
    for (int64_t i; (i = job.next.fetch_add(1, std::memory_order_relaxed)) < job.n; ++completed) {
      job.task(i);
    }
#if defined(_OPENMP)
    omp_set_num_threads(omp_threads);
#endif
    return completed;
  }

  /// Takes an exhausted job off the queue (under mutex_).
  void retire(Job& job) {
    const auto it = std::find(jobs_.begin(), jobs_.end(), &job);
    if (it != jobs_.end()) jobs_.erase(it);
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      Job& job = *jobs_.front();
      ++job.attached;
      lock.unlock();
      const int64_t completed = run(job);
      lock.lock();
      retire(job);
      job.done += completed;
      --job.attached;
      if (job.done == job.n && job.attached == 0) job.finished.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Job*> jobs_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

#if defined(_OPENMP)
/// \brief OpenMP's worksharing loop (schedule dynamic) for engines that already run an OpenMP
/// team. Waiting follows OMP_WAIT_POLICY: libgomp spins before it sleeps unless it is `passive`.
class OpenMPExecutor final : public Executor {
 public:
  int concurrency() const override { return omp_get_max_threads(); }
  void parallel_for(int64_t n, TaskRef task) override {
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < n; ++i) task(i);
  }
};
#endif

namespace detail {

/// Threads of the default pool: KVPACK_NUM_THREADS when it is a positive integer, else 0 (the
/// hardware's count).
inline int default_thread_count() {
  const char* env = std::getenv("KVPACK_NUM_THREADS");
  if (env == nullptr) return 0;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  return end != env && *end == '\0' && n > 0 && n <= 4096 ? static_cast<int>(n) : 0;
}

}  // namespace detail

/// The executor of every cache not given another: one ThreadPool per process, started on first
/// use (its size: see detail::default_thread_count).
inline Executor& default_executor() {
  static ThreadPool pool(detail::default_thread_count());
  return pool;
}

namespace detail {

/// Runs body(i) for i in [0, n) on `executor`. Every task runs; when some throw, the exception of
/// the lowest index is rethrown here, so the error does not depend on the schedule.
template <class Body>
void parallel_for(Executor& executor, int64_t n, Body&& body) {
  if (n <= 0) return;
  if (n == 1 || executor.concurrency() <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::mutex mutex;
  std::exception_ptr failure;
  int64_t failed_index = n;
  auto task = [&](int64_t i) {
    try {
      body(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (i < failed_index) {
        failed_index = i;
        failure = std::current_exception();
      }
    }
  };
  executor.parallel_for(n, TaskRef(task));
  if (failure) std::rethrow_exception(failure);
}

}  // namespace detail
}  // namespace kvpack
