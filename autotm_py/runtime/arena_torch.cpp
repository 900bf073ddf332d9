// The allocator PyTorch calls for CUDA memory: arena.c's, behind PyTorch's pluggable allocator.
// Built against PyTorch's headers and libraries by runtime/arena.py (build_torch_library), as
// one unit with arena.c, which it includes.
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <memory>
#include <string>

#include "arena.c"

// PyTorch does not check the pointer an allocator returns: a refused request is raised as its
// out-of-memory error, which callers such as cuDNN's algorithm search catch.
extern "C" void *autotm_alloc(size_t size, int device, void *stream) {
    void *p = autotm_try_alloc(size, device, stream);
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "the planned arena cannot give ", size,
                     " bytes (", autotm_arena_stat(0), " in use, ", autotm_arena_stat(6), " blocks live)");
    return p;
}

namespace {

// cuDNN asks the allocator for its largest free block before it picks a convolution's
// algorithm by workspace; PyTorch's own pluggable allocator refuses that question. The answer
// (autotm_arena_largest) is the bytes the limit still allows, bounded by the workspace the plan
// left room for where a step sets it: it depends only on what is live and on the plan, so
// that a step replayed from its layout sees the same answers, and picks the same algorithms,
// as the step recorded (its largest gap would depend on where the blocks lie).
struct ArenaAllocator final : torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator {
    using CUDAPluggableAllocator::CUDAPluggableAllocator;

    void cacheInfo(c10::DeviceIndex /*device*/, size_t *largest) override {
        *largest = static_cast<size_t>(autotm_arena_largest());
    }

    std::string name() override { return "autotm_planned_arena"; }
};

}  // namespace

static std::string install_error_;
static std::shared_ptr<c10::cuda::CUDACachingAllocator::CUDAAllocator> *keep_ = nullptr;

// Makes the arena the allocator of every CUDA device in the process; 0 on success, else the
// reason is in autotm_install_error. Must come before PyTorch first allocates CUDA memory.
extern "C" int autotm_install(void) {
    try {
        auto allocator = std::make_shared<ArenaAllocator>(
            [](size_t n, int device, cudaStream_t stream) { return autotm_alloc(n, device, stream); },
            [](void *p, size_t n, int device, cudaStream_t stream) { autotm_free(p, n, device, stream); });
        torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(allocator);
        // Never released: tensors that C++ statics hold (cuBLAS workspaces among them) are
        // freed while the process exits, possibly after PyTorch's own reference to the
        // allocator is gone. On the first GPU run a child process that had run its steps died
        // of signal 11 with nothing on stderr; this teardown is the likely place.
        keep_ = new std::shared_ptr<c10::cuda::CUDACachingAllocator::CUDAAllocator>(allocator);
        return 0;
    } catch (const std::exception &e) {
        install_error_ = e.what();
        return 1;
    }
}

extern "C" const char *autotm_install_error(void) { return install_error_.c_str(); }
