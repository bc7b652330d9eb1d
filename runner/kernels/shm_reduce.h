// The collectives of tensor-parallel ranks on one machine, through a segment of shared memory
// (shm_reduce.cpp says how; runner/sharders/shm.py makes the segment).
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>

namespace runner {

// One rank's view of a segment every rank has mapped and joined (shm_join). Every rank must make
// the same calls, with the same sizes, in the same order.
class Segment {
 public:
  Segment(const at::Tensor& segment, int64_t rank, int64_t world_size, const char* name);

  // y = the sum of every rank's x (n values), in rank order in fp32, rounded once to T: the same
  // values on every rank. y may be x.
  template <typename T>
  void all_reduce(const T* x, T* y, int64_t n) const;

  // y [world_size, bytes] = every rank's x (bytes), in rank order.
  void all_gather(const uint8_t* x, uint8_t* y, int64_t bytes) const;

  // A rank's line of the segment's header.
  struct alignas(64) Line {
    std::atomic<uint64_t> published;  // chunks this rank has put in its slots
    int64_t pid;                      // this rank's process (shm_join)
    double timeout_s;                 // how long it waits for a peer before giving up (shm_join)
  };

  Line& line(int64_t r) const { return reinterpret_cast<Line*>(base_)[r]; }

 private:
  // x's bytes a slot at a time: into this rank's slot, published, and once every rank has
  // published its own, use(offset, count, chunk) reads the chunk's slots.
  template <typename Use>
  void exchange(const uint8_t* x, int64_t bytes, Use use) const;
  void wait_for(int64_t peer, uint64_t chunk) const;
  uint8_t* slot(int64_t r, uint64_t chunk) const { return base_ + header_ + (2 * r + chunk % 2) * slot_bytes_; }

  uint8_t* base_;
  int64_t rank_, world_size_, header_, slot_bytes_;
  const char* name_;  // the op's, for errors
};

}  // namespace runner
