// How the CUDA kernel's launches cover a list of tensors.  Host-only code, so
// the CPU build registers it as a test op and the CUDA plumbing (slots, chunk
// indices, launch boundaries) is checked on machines without a GPU.
#pragma once

#include <cstdint>
#include <vector>

namespace adan_plugin {

// A launch passes its tensors' pointers and its block->chunk map by value in
// the kernel argument (< 4 KiB with these sizes); a block owns one chunk.
constexpr int kLaunchMaxTensors = 32;
constexpr int kLaunchMaxBlocks = 320;
constexpr int64_t kLaunchChunk = 65536;

struct LaunchPlan {
  std::vector<int64_t> slot_tensor;  // index (into the call's lists) of the tensor in each slot
  std::vector<int32_t> block_slot;   // per block: the slot of the tensor it works on
  std::vector<int64_t> block_chunk;  // per block: which chunk of that tensor
};

// Empty tensors get no slot; a tensor whose chunks do not fit the current
// launch continues in the next one, where it takes slot 0 again.
inline std::vector<LaunchPlan> plan_launches(const std::vector<int64_t>& numels) {
  std::vector<LaunchPlan> launches;
  LaunchPlan cur;
  auto flush = [&] {
    if (!cur.block_slot.empty()) launches.push_back(std::move(cur));
    cur = LaunchPlan{};
  };
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] == 0) continue;
    if (static_cast<int>(cur.slot_tensor.size()) == kLaunchMaxTensors ||
        static_cast<int>(cur.block_slot.size()) == kLaunchMaxBlocks)
      flush();
    cur.slot_tensor.push_back(static_cast<int64_t>(i));
    const int64_t chunks = (numels[i] + kLaunchChunk - 1) / kLaunchChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (static_cast<int>(cur.block_slot.size()) == kLaunchMaxBlocks) {
        flush();
        cur.slot_tensor.push_back(static_cast<int64_t>(i));
      }
      cur.block_slot.push_back(static_cast<int32_t>(cur.slot_tensor.size() - 1));
      cur.block_chunk.push_back(c);
    }
  }
  flush();
  return launches;
}

}  // namespace adan_plugin
