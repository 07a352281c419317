// tests/cuda_on_cpu.hpp -- just enough of CUDA for kernels.cu to compile as ordinary C++ and run
// on the CPU, so `make test` checks every kernel on machines without a GPU.
//
// A launch runs every thread of every block on the CPU, in one of three orders (below). That is
// only right because no kernel in kernels.cu talks to another thread (no shared memory, no
// __syncthreads, no atomics): each CUDA thread computes its own outputs. "Device memory" is host
// memory. Launch from one host thread at a time (gridDim and blockDim are shared), as on one CUDA
// stream.
//
// The orders: a GPU runs the threads of a launch in no fixed order, so a kernel whose outputs
// depend on the order (two CUDA threads writing one number: a race) is wrong, even where it passes
// in one order. tests/test_kernels.cpp runs the model in all three and requires the same bytes.
//   NATURAL   block after block, the threads of a block in order (x fastest); with OpenMP the
//             blocks are spread over CPU threads (blockIdx, threadIdx are per CPU thread)
//   REVERSE   every (block, thread) in exactly the opposite order, on one CPU thread
//   SHUFFLED  every (block, thread) in a random order, a new one each launch, on one CPU thread;
//             the order comes from cuda_on_cpu_seed, which each launch advances (deterministic)
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 gridDim, blockDim;                      // set once per launch, read by every thread
inline thread_local dim3 blockIdx, threadIdx;       // the running thread's coordinates

enum CudaOnCpuOrder { NATURAL, REVERSE, SHUFFLED };
inline CudaOnCpuOrder cuda_on_cpu_order = NATURAL;
inline uint64_t cuda_on_cpu_seed = 0;   // SHUFFLED's generator state

// splitmix64: the next random number from cuda_on_cpu_seed
inline uint64_t cuda_on_cpu_random() {
    uint64_t z = (cuda_on_cpu_seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// the n CUDA threads of a launch, numbered blk * (threads per block) + thr, in REVERSE or
// SHUFFLED order (a Fisher-Yates shuffle; the modulo's bias is harmless here)
inline std::vector<long> cuda_on_cpu_schedule(long n) {
    std::vector<long> order(n);
    for (long i = 0; i < n; i++) order[i] = cuda_on_cpu_order == REVERSE ? n - 1 - i : i;
    if (cuda_on_cpu_order == SHUFFLED)
        for (long i = n - 1; i > 0; i--) std::swap(order[i], order[cuda_on_cpu_random() % (i + 1)]);
    return order;
}

// blockIdx and threadIdx of block blk, thread thr (x fastest, then y, then z)
inline void cuda_on_cpu_place(long blk, long thr) {
    blockIdx = dim3(blk % gridDim.x, blk / gridDim.x % gridDim.y, blk / gridDim.x / gridDim.y);
    threadIdx = dim3(thr % blockDim.x, thr / blockDim.x % blockDim.y, thr / blockDim.x / blockDim.y);
}

// LAUNCH(kernel, grid, block, args...) is kernel<<<grid, block>>>(args...) under nvcc
#ifdef _OPENMP
#define CUDA_ON_CPU_BLOCKS _Pragma("omp parallel for")
#else
#define CUDA_ON_CPU_BLOCKS
#endif
#define LAUNCH(kernel, grid, block, ...)                                                            \
    do {                                                                                            \
        gridDim = dim3(grid);                                                                       \
        blockDim = dim3(block);                                                                     \
        long nblocks_ = (long)gridDim.x * gridDim.y * gridDim.z;                                    \
        long nthreads_ = (long)blockDim.x * blockDim.y * blockDim.z;                                \
        if (cuda_on_cpu_order == NATURAL) {                                                         \
            CUDA_ON_CPU_BLOCKS for (long blk_ = 0; blk_ < nblocks_; blk_++)                         \
                for (long thr_ = 0; thr_ < nthreads_; thr_++) {                                     \
                    cuda_on_cpu_place(blk_, thr_);                                                  \
                    kernel(__VA_ARGS__);                                                            \
                }                                                                                   \
        } else {                                                                                    \
            for (long i_ : cuda_on_cpu_schedule(nblocks_ * nthreads_)) {                            \
                cuda_on_cpu_place(i_ / nthreads_, i_ % nthreads_);                                  \
                kernel(__VA_ARGS__);                                                                \
            }                                                                                       \
        }                                                                                           \
    } while (0)

// the runtime API on host memory
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };

template <class T> cudaError_t cudaMalloc(T** p, size_t bytes) {
    *p = (T*)malloc(bytes ? bytes : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
    memmove(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) { memset(p, value, bytes); return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }   // "the CPU"
struct cudaDeviceProp { char name[256]; };
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    snprintf(p->name, sizeof p->name, "the CPU (tests/cuda_on_cpu.hpp)");
    return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "out of memory"; }
