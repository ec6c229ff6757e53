// Thread pool behind ppml::cpu::parallel_run (see parallel.h for why it exists).
#include "parallel.h"

#include <pthread.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PPML_PAUSE() _mm_pause()
#else
#define PPML_PAUSE() std::this_thread::yield()
#endif

namespace ppml::cpu {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_job_.notify_all();
    for (auto& t : workers_) t.join();
  }

  bool try_run(int nthreads, const std::function<void(int, int)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    ensure_workers(nthreads - 1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &fn;
      job_threads_ = nthreads;
      pending_ = nthreads - 1;
      ++generation_;
    }
    cv_job_.notify_all();
    fn(0, nthreads);
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      int index = static_cast<int>(workers_.size()) + 1;
      uint64_t seen;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = generation_;  // the next job is the first this worker may take
      }
      workers_.emplace_back([this, index, seen] { loop(index, seen); });
    }
  }

  void loop(int index, uint64_t seen) {
    for (;;) {
      const std::function<void(int, int)>* job;
      int nthreads;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_job_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
        nthreads = job_threads_;
      }
      if (index < nthreads) {
        (*job)(index, nthreads);
        std::lock_guard<std::mutex> lock(mu_);
        if (--pending_ == 0) cv_done_.notify_one();
      }
    }
  }

  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_job_, cv_done_;
  std::vector<std::thread> workers_;
  const std::function<void(int, int)>* job_ = nullptr;
  int job_threads_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool* g_pool = nullptr;
std::once_flag g_once;

void reset_after_fork() {
  // The child has no worker threads: abandon the parent's pool (its memory is the child's
  // copy, its mutexes may be held) and start a new one on first use.
  g_pool = new Pool();
}

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();  // never destroyed: workers must outlive static destructors
    pthread_atfork(nullptr, nullptr, reset_after_fork);
  });
  return *g_pool;
}

}  // namespace

void parallel_run(int num_threads, const std::function<void(int, int)>& fn) {
  if (num_threads <= 1 || !pool().try_run(num_threads, fn)) fn(0, 1);
}

void Barrier::wait() {
  int my_sense = 1 - sense_.load(std::memory_order_relaxed);
  if (count_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    count_.store(n_, std::memory_order_relaxed);
    sense_.store(my_sense, std::memory_order_release);
    return;
  }
  int spins = 0;
  while (sense_.load(std::memory_order_acquire) != my_sense) {
    if (++spins < 4096) {
      PPML_PAUSE();
    } else {
      std::this_thread::yield();  // a worker was descheduled: stop burning its core
    }
  }
}

}  // namespace ppml::cpu
