// The collectives of tensor-parallel ranks on one machine, through shared memory:
//
//   shm_join(segment, rank, world_size, timeout_s)   once per rank, before any other call
//   shm_all_reduce(x, segment, rank, world_size)     the sum of every rank's x, the same on each
//   shm_all_gather(x, segment, rank, world_size)     every rank's x, [world_size, *x.shape]
//
// gloo's all-reduce between processes on one machine goes through sockets and costs a millisecond
// or more, and a decode step makes two a layer; this one costs a copy, a store and a few loads.
//
// The segment (uint8, a file in /dev/shm that every rank maps) holds a 64-byte line per rank, then
// two slots per rank, filling the rest:
//
//   line r   rank r's count of published chunks, its pid, its timeout (Segment::Line)
//   slots    [rank][2][slot_bytes]
//
// A call goes a chunk (a slot's worth) at a time. For its s-th chunk a rank copies its values into
// its slot s % 2, publishes s, waits until every rank has published s, and reads slot s % 2 of every
// rank: an all-reduce sums them in rank order, in fp32, rounding once, so every rank gets the same
// values; an all-gather copies them out. Two slots a rank, so that a rank running ahead writes
// chunk s + 1 while its peers still read chunk s; it cannot reach s + 2 before each of them has
// published s + 1, which each does only once done reading s. The counts live in the segment: the
// ops keep no state of their own.
//
// A rank waiting for a peer spins, then yields (wait.h), and now and then checks that the peer's
// process still runs (a dead rank ends the wait at once, as a closed socket ends gloo's) and that
// it has not waited longer than runner.parallel.TIMEOUT.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "ops.h"
#include "shm_reduce.h"
#include "vec.h"
#include "wait.h"

namespace runner {
namespace {

constexpr int64_t kLine = 64;
constexpr int64_t kMinSlot = 4096;
constexpr int64_t kCheckEvery = 1024;  // waits between looks at the clock and the peer's process

// Whether process `pid` still runs: a dead one its parent has not reaped yet is a zombie, which
// kill() still finds, so /proc says.
bool alive(int64_t pid) {
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return true;  // no /proc here: kill's answer stands
  char stat[512];
  const size_t n = std::fread(stat, 1, sizeof stat - 1, f);
  std::fclose(f);
  stat[n] = '\0';
  const char* name_end = std::strrchr(stat, ')');  // "pid (name) state ...": the name may hold anything
  return !(name_end != nullptr && name_end[1] == ' ' && (name_end[2] == 'Z' || name_end[2] == 'X'));
}

}  // namespace

Segment::Segment(const at::Tensor& segment, int64_t rank, int64_t world_size, const char* name)
    : rank_(rank), world_size_(world_size), name_(name) {
  TORCH_CHECK(segment.device().is_cpu() && segment.scalar_type() == at::kByte && segment.dim() == 1 &&
                  segment.is_contiguous(),
              "runner::", name, ": segment must be a contiguous 1-D uint8 CPU tensor");
  TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "runner::", name, ": rank ", rank,
              " is not one of ", world_size);
  base_ = segment.data_ptr<uint8_t>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base_) % kLine == 0, "runner::", name, ": segment must start on a ",
              kLine, "-byte boundary");
  header_ = kLine * world_size;
  slot_bytes_ = (segment.numel() - header_) / (2 * world_size) / kLine * kLine;
  TORCH_CHECK(slot_bytes_ >= kMinSlot, "runner::", name, ": a segment of ", segment.numel(), " bytes is too small for ",
              world_size, " ranks (", header_ + 2 * world_size * kMinSlot, " at least)");
}

void Segment::wait_for(int64_t peer, uint64_t chunk) const {
  const Line& theirs = line(peer);
  Backoff backoff;
  std::chrono::steady_clock::time_point since;
  while (theirs.published.load(std::memory_order_acquire) < chunk) {
    const int64_t waits = backoff();
    if (waits % kCheckEvery != 0) continue;
    const auto now = std::chrono::steady_clock::now();
    if (waits == kCheckEvery) since = now;
    TORCH_CHECK(alive(theirs.pid), "runner::", name_, ": rank ", peer, " ended while this rank waited for it");
    const double waited = std::chrono::duration<double>(now - since).count();
    TORCH_CHECK(waited < line(rank_).timeout_s, "runner::", name_, ": rank ", rank_, " waited ", waited, " s for rank ",
                peer, " (the limit is runner.parallel.TIMEOUT); a rank hangs, or the ranks ran different steps");
  }
}

template <typename Use>
void Segment::exchange(const uint8_t* x, int64_t bytes, Use use) const {
  Line& mine = line(rank_);
  TORCH_CHECK(mine.timeout_s > 0, "runner::", name_, ": rank ", rank_, " has not joined the segment (shm_join)");
  for (int64_t offset = 0; offset < bytes; offset += slot_bytes_) {
    const int64_t count = std::min(slot_bytes_, bytes - offset);
    const uint64_t chunk = mine.published.load(std::memory_order_relaxed) + 1;
    std::memcpy(slot(rank_, chunk), x + offset, count);
    mine.published.store(chunk, std::memory_order_release);
    for (int64_t r = 0; r < world_size_; ++r)
      if (r != rank_) wait_for(r, chunk);
    use(offset, count, chunk);
  }
}

template <typename T>
void Segment::all_reduce(const T* x, T* y, int64_t n) const {
  // Slots hold whole values: slot_bytes_ is a multiple of 64.
  exchange(reinterpret_cast<const uint8_t*>(x), n * sizeof(T), [&](int64_t offset, int64_t count, uint64_t chunk) {
    const int64_t start = offset / sizeof(T);
    at::parallel_for(0, count / sizeof(T), 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float sum = widen(reinterpret_cast<const T*>(slot(0, chunk))[i]);
        for (int64_t r = 1; r < world_size_; ++r) sum += widen(reinterpret_cast<const T*>(slot(r, chunk))[i]);
        y[start + i] = static_cast<T>(sum);
      }
    });
  });
}

template void Segment::all_reduce<float>(const float*, float*, int64_t) const;
template void Segment::all_reduce<BFloat16>(const BFloat16*, BFloat16*, int64_t) const;

void Segment::all_gather(const uint8_t* x, uint8_t* y, int64_t bytes) const {
  exchange(x, bytes, [&](int64_t offset, int64_t count, uint64_t chunk) {
    for (int64_t r = 0; r < world_size_; ++r) std::memcpy(y + r * bytes + offset, slot(r, chunk), count);
  });
}

namespace {

// Put this rank's pid and timeout in its line: from then on its peers can tell it has died.
void shm_join(at::Tensor& segment, int64_t rank, int64_t world_size, double timeout_s) {
  TORCH_CHECK(timeout_s > 0, "runner::shm_join: timeout_s must be > 0, got ", timeout_s);
  const Segment shared(segment, rank, world_size, "shm_join");
  Segment::Line& mine = shared.line(rank);
  mine.pid = getpid();
  mine.timeout_s = timeout_s;
}

at::Tensor shm_all_reduce(const at::Tensor& x, const at::Tensor& segment, int64_t rank, int64_t world_size) {
  check_cpu_float(x, "shm_all_reduce");
  const Segment shared(segment, rank, world_size, "shm_all_reduce");
  const auto xc = x.contiguous();
  auto y = at::empty(xc.sizes(), xc.options());
  if (x.scalar_type() == at::kBFloat16)
    shared.all_reduce(xc.const_data_ptr<BFloat16>(), y.mutable_data_ptr<BFloat16>(), xc.numel());
  else
    shared.all_reduce(xc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), xc.numel());
  return y;
}

at::Tensor shm_all_gather(const at::Tensor& x, const at::Tensor& segment, int64_t rank, int64_t world_size) {
  TORCH_CHECK(x.device().is_cpu(), "runner::shm_all_gather: CPU tensors only, got ", x.device());
  const Segment shared(segment, rank, world_size, "shm_all_gather");
  const auto xc = x.contiguous();
  std::vector<int64_t> shape{world_size};
  shape.insert(shape.end(), xc.sizes().begin(), xc.sizes().end());
  auto y = at::empty(shape, xc.options());
  shared.all_gather(static_cast<const uint8_t*>(xc.const_data_ptr()), static_cast<uint8_t*>(y.mutable_data_ptr()),
                    xc.nbytes());
  return y;
}

}  // namespace
}  // namespace runner

TORCH_LIBRARY_FRAGMENT(runner, m) {
  m.def("shm_join(Tensor(a!) segment, int rank, int world_size, float timeout_s) -> ()");
  m.def("shm_all_reduce(Tensor x, Tensor segment, int rank, int world_size) -> Tensor");
  m.def("shm_all_gather(Tensor x, Tensor segment, int rank, int world_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(runner, CPU, m) {
  m.impl("shm_join", &runner::shm_join);
  m.impl("shm_all_reduce", &runner::shm_all_reduce);
  m.impl("shm_all_gather", &runner::shm_all_gather);
}
