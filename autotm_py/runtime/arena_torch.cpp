// The allocator PyTorch's pluggable CUDA allocator calls: arena.c's, with a refused request
// raised as PyTorch's out-of-memory error (PyTorch does not check for NULL). Built against
// PyTorch's headers and libraries by runtime/arena.py (build_torch_library), as one unit with
// arena.c, which it includes.
#include <c10/util/Exception.h>

#include "arena.c"

extern "C" void *autotm_alloc(size_t size, int device, void *stream) {
    void *p = autotm_try_alloc(size, device, stream);
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "the planned arena cannot give ", size,
                     " bytes (", autotm_arena_stat(0), " in use, ", autotm_arena_stat(6), " blocks live)");
    return p;
}
